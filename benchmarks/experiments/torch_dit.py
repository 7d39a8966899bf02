"""The DiT's population evaluation the PyTorch ways, for `benchmarks.perf_big`.

A DiT of the same shape as `tmpq_jax.models.dit` (adaLN-Zero blocks, q/k/v/out
projections, GELU MLP, patchify as a linear layer on 2x2 patches), random weights,
bfloat16 on the GPU. Every linear layer fake-quantizes its input per tensor and its
weight per output channel, and both operands of q.k and p.v per tensor (the softmax
at 8 bits), the original TMPQ-DM code's way. Two ways to switch a candidate's bits:
* eager: the bits are Python ints on each layer, set per candidate;
* compile: the bits are int tensors (buffers) filled per candidate, so the one
  `torch.compile`d forward serves every candidate without recompiling.
Each candidate draws S images over N Euler steps (flow: x += (t' - t) v). Seconds
per candidate, median of `repeats`, after a warm-up candidate.
"""

import math
import random
import statistics
import time


def measure(cfg: dict, population: int, samples: int, steps: int, repeats: int,
            compile_ok: bool = True) -> dict:  # fmt: skip
    import torch
    import torch.nn.functional as F
    from torch import nn

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    w, heads, p = cfg["width"], cfg["heads"], cfg["patch"]
    grid, ch = cfg["image_size"] // p, cfg["channels"]

    def fq(x, bits, dim=None):  # symmetric fake quant, per tensor or per row
        qmax = 2.0 ** (bits - 1) - 1  # int or tensor: no recompile for a tensor
        amax = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
        s = amax.clamp_min(1e-8) / qmax
        return torch.round(x / s).clamp(-qmax, qmax) * s

    class QLinear(nn.Linear):
        def forward(self, x):
            wq = fq(self.weight, self.wb, 1)
            return F.linear(fq(x, self.ab), wq, self.bias)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.adaln, self.q, self.k, self.v = (QLinear(w, n) for n in (6 * w, w, w, w))
            self.o, self.fc1, self.fc2 = QLinear(w, w), QLinear(w, 4 * w), QLinear(4 * w, w)

        def forward(self, x, c):
            sh1, sc1, g1, sh2, sc2, g2 = self.adaln(F.silu(c))[:, None].chunk(6, -1)
            h = F.layer_norm(x, (w,)) * (1 + sc1) + sh1
            b, n, _ = h.shape
            q, k, v = (f(h).view(b, n, heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            att = fq(q, self.qb) @ fq(k, self.kb).transpose(-1, -2) / math.sqrt(w // heads)
            h = (fq(att.softmax(-1), 8) @ fq(v, self.vb)).transpose(1, 2).reshape(b, n, w)
            x = x + g1 * self.o(h)
            h = F.layer_norm(x, (w,)) * (1 + sc2) + sh2
            return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch, self.t0, self.t1 = QLinear(p * p * ch, w), QLinear(256, w), QLinear(w, w)
            self.y = nn.Embedding(cfg["num_classes"] + 1, w)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["depth"]))
            self.final_adaln, self.final = QLinear(w, 2 * w), QLinear(w, p * p * ch)
            self.register_buffer("pos", torch.randn(grid * grid, w) * 0.02)

        def forward(self, x, t, y):  # x [B, H, W, C]
            b = x.shape[0]
            h = x.view(b, grid, p, grid, p, ch).transpose(2, 3).reshape(b, grid * grid, -1)
            h = self.patch(h) + self.pos
            f = torch.exp(-math.log(1e4) * torch.arange(128, device=x.device) / 128)
            a = (t * 1000.0)[:, None] * f[None]
            c = self.t1(F.silu(self.t0(torch.cat([a.sin(), a.cos()], -1).to(x.dtype))))
            c = c + self.y(y)
            for blk in self.blocks:
                h = blk(h, c)
            sh, sc = self.final_adaln(F.silu(c))[:, None].chunk(2, -1)
            h = self.final(F.layer_norm(h, (w,)) * (1 + sc) + sh)
            return h.view(b, grid, grid, p, p, ch).transpose(2, 3).reshape(x.shape)

    model = DiT().to(dev, dtype).eval()
    sites = [(m, a) for m in model.modules() for a in (
        ("wb", "ab") if isinstance(m, QLinear) else ("qb", "kb", "vb") if isinstance(m, Block) else ())]  # fmt: skip
    x0 = torch.randn(samples, grid * p, grid * p, ch, device=dev, dtype=dtype)
    y = torch.arange(samples, device=dev) % cfg["num_classes"]
    ts = torch.linspace(1.0, 0.0, steps + 1, device=dev)
    genomes = [[random.Random(i).choice((8, 7, 6, 5)) for _ in sites] for i in range(population)]

    def set_bits(genome, as_tensor):
        for (m, attr), b in zip(sites, genome, strict=True):
            if as_tensor:
                getattr(m, attr).fill_(b)
            else:
                setattr(m, attr, b)

    def run(fwd, as_tensor):
        def one_population():
            for g in genomes:
                set_bits(g, as_tensor)
                x = x0
                for i in range(steps):
                    t = ts[i].expand(samples).to(dtype)
                    x = x + (ts[i + 1] - ts[i]) * fwd(x, t, y)
            if dev == "cuda":
                torch.cuda.synchronize()
        one_population()  # warm-up (and compile)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            one_population()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / population

    out = dict(device=str(torch.cuda.get_device_name() if dev == "cuda" else dev),
               torch_version=torch.__version__, dtype=str(dtype))  # fmt: skip
    with torch.inference_mode():
        out["eager_seconds_per_candidate"] = run(model, False)
        if compile_ok:
            for m, attr in sites:  # the bits as tensors: one graph for every genome
                delattr(m, attr)
                m.register_buffer(attr, torch.tensor(8.0, device=dev, dtype=dtype))
            try:
                out["compile_seconds_per_candidate"] = run(torch.compile(model), True)
            except Exception as e:  # noqa: BLE001 - recorded; eager stands alone
                out["compile_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            out["compile_error"] = "skipped: too little of the time budget left"
    ways = [v for k, v in out.items() if k.endswith("_seconds_per_candidate")]
    out["best_seconds_per_candidate"] = min(ways)
    return out
