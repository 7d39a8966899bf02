"""The shipped UNet ported to PyTorch, with fake-quant modules in the original's style.

Benchmark-only (`benchmarks/experiments/torch_eager.py`; needs the optional `[bench]` extra): the
baseline a TMPQ-DM user would have, i.e. the PyTorch original's way (TMPQ-DM builds on
the Q-Diffusion / BRECQ code base): every conv / linear / attention matmul is a module
holding a weight quantizer and an activation quantizer whose bit-widths are plain
Python attributes, switched per candidate genome, and a candidate is evaluated by an
eager sampling loop, one candidate after another.

Same network and numerics as `tmpq_jax/models/unet.py` (NCHW here): GroupNorm (eps
1e-6), SiLU, Flax 'SAME' padding (asymmetric (0, 1) for the stride-2 downsampling
convs), nearest x2 upsampling, sinusoidal timestep embedding, single-head attention
through two matmuls with the softmax in float32. Params come from the Flax tree
(`load_flax_params`: conv kernels HWIO -> OIHW, dense kernels transposed).

Quantizers replicate `tmpq_jax/quant/numerics.py` (AQT `IntSymmetric`, preserve_zero):
scale = bound / (2**(b-1) - 0.5), q = round_half_even(clip(x * (1/scale),
+-(2**(b-1) - 1))), dequant q * scale. Activations per tensor with the calibrated
static bound; weights per output channel, bound = channel absmax x calibrated clip
ratio (recomputed every forward, as the original's weight quantizer does). The
softmax output (`av`'s left operand) is pinned at 8 bits.

`order="fake"` (default, the original's way): conv/linear/einsum on the dequantized
operands. `order="aqt"`: conv/linear/einsum on the integer-valued operands, the
scales applied to the output, as AQT does; it differs from "fake" only by float
rounding (a second check of the port against `quantized_apply`; not timed).
No JAX import here: torch + numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GN_EPS = 1e-6  # flax.linen.GroupNorm's default epsilon


def _f32(v) -> float:
    """A Python float holding exactly the float32 value of `v` (torch casts
    Python scalars to the tensor's float32 dtype: no second rounding)."""
    return float(np.float32(v))


def quant_bound(bits: int) -> float:
    """AQT IntSymmetric(preserve_zero) edge of the last bucket: 2**(b-1) - 0.5."""
    return 2.0 ** (bits - 1) - 0.5


def clip_bound(bits: int) -> float:
    """The largest integer kept: 2**(b-1) - 1."""
    return 2.0 ** (bits - 1) - 1.0


class _Scalars(nn.Module):
    """Per-candidate scalars of a quantizer: Python floats (eager; the original's
    way) or 0-d buffers filled in place (`tensor_mode`: no recompiles under
    torch.compile when the candidate changes)."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self._names = tuple(names)
        self.tensor_mode = False
        for n in self._names:
            setattr(self, n, 1.0)

    def to_tensor_mode(self, device) -> None:
        if self.tensor_mode:
            return
        for n in self._names:
            value = float(getattr(self, n))
            delattr(self, n)
            self.register_buffer(
                n, torch.tensor(value, dtype=torch.float32, device=device)
            )
        self.tensor_mode = True

    def assign(self, **values: float) -> None:
        for n, v in values.items():
            if self.tensor_mode:
                getattr(self, n).fill_(v)
            else:
                setattr(self, n, v)


class ActQuantizer(_Scalars):
    """Per-tensor symmetric fake quant with a static (calibrated) |x| bound."""

    def __init__(self):
        super().__init__(("scale", "inv_scale", "clip"))
        self.bits: int | None = None  # None: float (quantizer off)
        self.on = False  # what forward reads (torch.compile guards on it, not on bits)

    def set(self, bits: int | None, bound: float = 1.0) -> None:
        self.bits, self.on = bits, bits is not None
        if bits is None:
            return
        b = np.float32(bound)
        if b == 0.0:
            b = np.float32(1.0)
        scale = b / np.float32(quant_bound(bits))
        inv = np.float32(1.0) / scale
        self.assign(scale=_f32(scale), inv_scale=_f32(inv), clip=clip_bound(bits))

    def quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        q = torch.round(torch.clamp(x * self.inv_scale, -self.clip, self.clip))
        return q, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x
        q, s = self.quant(x)
        return q * s


class WeightQuantizer(_Scalars):
    """Symmetric per-output-channel (dim 0) fake quant; bound = channel absmax x the
    calibrated clip ratio of the current width."""

    def __init__(self):
        super().__init__(("qbound", "clip"))
        self.bits: int | None = None
        self.on = False
        self.clip_ratio: torch.Tensor | None = None  # [C_out] or None

    def set(self, bits: int | None, clip_ratio: torch.Tensor | None = None) -> None:
        self.bits, self.on = bits, bits is not None
        if bits is None:
            return
        self.assign(qbound=quant_bound(bits), clip=clip_bound(bits))
        if not self.tensor_mode or clip_ratio is None:
            self.clip_ratio = clip_ratio
        elif "clip_ratio" in self._buffers:  # filled in place: no recompile
            self.clip_ratio.copy_(clip_ratio)
        else:
            delattr(self, "clip_ratio")
            self.register_buffer("clip_ratio", clip_ratio.clone())

    def quant(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (w.ndim - 1)
        absmax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
        absmax = torch.where(absmax == 0.0, torch.ones_like(absmax), absmax)
        if self.clip_ratio is not None:
            absmax = absmax * self.clip_ratio.view(shape)
        scale = absmax / self.qbound
        q = torch.round(torch.clamp(w * torch.reciprocal(scale), -self.clip, self.clip))
        return q, scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return w
        q, s = self.quant(w)
        return q * s


class QConv2d(nn.Conv2d):
    """nn.Conv2d with Flax 'SAME' padding and weight + input-activation quantizers."""

    def __init__(self, name: str, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0)
        self.layer_name = name
        self.wq, self.aq = WeightQuantizer(), ActQuantizer()
        self.order = "fake"

    def _same(self, n: int) -> tuple[int, int]:
        k, s = self.kernel_size[0], self.stride[0]
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    def _conv(self, x, w, b):
        (h0, h1), (w0, w1) = self._same(x.shape[2]), self._same(x.shape[3])
        if h0 == h1 and w0 == w1:
            return F.conv2d(x, w, b, self.stride, (h0, w0))
        return F.conv2d(F.pad(x, (w0, w1, h0, h1)), w, b, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.aq.on or self.wq.on):
            return self._conv(x, self.weight, self.bias)
        if self.order == "aqt":
            (qx, sx), (qw, sw) = self.aq.quant(x), self.wq.quant(self.weight)
            y = self._conv(qx, qw, None) * sx * sw.view(1, -1, 1, 1)
            return y + self.bias.view(1, -1, 1, 1)
        return self._conv(self.aq(x), self.wq(self.weight), self.bias)


class QLinear(nn.Linear):
    def __init__(self, name: str, cin: int, cout: int):
        super().__init__(cin, cout)
        self.layer_name = name
        self.wq, self.aq = WeightQuantizer(), ActQuantizer()
        self.order = "fake"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.aq.on or self.wq.on):
            return F.linear(x, self.weight, self.bias)
        if self.order == "aqt":
            (qx, sx), (qw, sw) = self.aq.quant(x), self.wq.quant(self.weight)
            return F.linear(qx, qw) * sx * sw.view(-1) + self.bias
        return F.linear(self.aq(x), self.wq(self.weight), self.bias)


class QMatMul(nn.Module):
    """einsum of two activations, each quantized per tensor (q.k and a.v)."""

    def __init__(self, name: str, equation: str):
        super().__init__()
        self.layer_name, self.equation = name, equation
        self.aq, self.bq = ActQuantizer(), ActQuantizer()
        self.order = "fake"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not (self.aq.on or self.bq.on):
            return torch.einsum(self.equation, a, b)
        if self.order == "aqt":
            (qa, sa), (qb, sb) = self.aq.quant(a), self.bq.quant(b)
            return torch.einsum(self.equation, qa, qb) * sa * sb
        return torch.einsum(self.equation, self.aq(a), self.bq(b))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0):
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, name: str, cin: int, cout: int, groups: int, temb_dim: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(groups, cin, eps=GN_EPS)
        self.conv0 = QConv2d(f"{name}/conv0", cin, cout, 3)
        self.temb = QLinear(f"{name}/temb", temb_dim, cout)
        self.norm1 = nn.GroupNorm(groups, cout, eps=GN_EPS)
        self.conv1 = QConv2d(f"{name}/conv1", cout, cout, 3)
        self.skip = QConv2d(f"{name}/skip", cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        if self.skip is not None:
            x = self.skip(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, name: str, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=GN_EPS)
        self.qkv = QLinear(f"{name}/qkv", ch, 3 * ch)
        self.qk = QMatMul(f"{name}/qk", "blhd,bmhd->bhlm")
        self.av = QMatMul(f"{name}/av", "bhlm,bmhd->blhd")
        self.proj = QLinear(f"{name}/proj", ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        nh, hd = self.heads, c // self.heads
        h = self.norm(x).reshape(b, c, hh * ww).transpose(1, 2)  # [B, L, C]
        qkv = self.qkv(h).reshape(b, hh * ww, 3, nh, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, nh, hd]
        logits = self.qk(q, k) / math.sqrt(hd)
        attn = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = self.av(attn, v).reshape(b, hh * ww, c)
        out = self.proj(out).transpose(1, 2).reshape(b, c, hh, ww)
        return x + out


class TorchUNet(nn.Module):
    """eps_theta(x_t, t): x [B, C, H, W], t [B]. Built from the UNetConfig fields."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        num_heads: int,
        num_groups: int,
        **unused,
    ):
        super().__init__()
        self.ch, self.ch_mult, self.nrb = ch, tuple(ch_mult), num_res_blocks
        tdim, g = 4 * ch, num_groups
        blocks: dict[str, nn.Module] = {}
        self.temb0 = QLinear("temb0", ch, tdim)
        self.temb1 = QLinear("temb1", tdim, tdim)
        self.conv_in = QConv2d("conv_in", channels, ch, 3)
        res, hc, skips = image_size, ch, [ch]
        for i, mult in enumerate(self.ch_mult):
            for j in range(num_res_blocks):
                name = f"down_{i}_res_{j}"
                blocks[name] = ResBlock(name, hc, ch * mult, g, tdim)
                hc = ch * mult
                if res in attn_resolutions:
                    name = f"down_{i}_attn_{j}"
                    blocks[name] = AttnBlock(name, hc, num_heads, g)
                skips.append(hc)
            if i < len(self.ch_mult) - 1:
                name = f"down_{i}_downsample"
                blocks[name] = QConv2d(name, hc, hc, 3, stride=2)
                res = -(-res // 2)
                skips.append(hc)
        blocks["mid_res_0"] = ResBlock("mid_res_0", hc, hc, g, tdim)
        blocks["mid_attn"] = AttnBlock("mid_attn", hc, num_heads, g)
        blocks["mid_res_1"] = ResBlock("mid_res_1", hc, hc, g, tdim)
        for i, mult in reversed(list(enumerate(self.ch_mult))):
            for j in range(num_res_blocks + 1):
                name = f"up_{i}_res_{j}"
                blocks[name] = ResBlock(name, hc + skips.pop(), ch * mult, g, tdim)
                hc = ch * mult
                if res in attn_resolutions:
                    name = f"up_{i}_attn_{j}"
                    blocks[name] = AttnBlock(name, hc, num_heads, g)
            if i > 0:
                name = f"up_{i}_upsample"
                blocks[name] = QConv2d(name, hc, hc, 3)
                res *= 2
        self.blocks = nn.ModuleDict(blocks)
        self.norm_out = nn.GroupNorm(g, hc, eps=GN_EPS)
        self.conv_out = QConv2d("conv_out", hc, channels, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        blk = self.blocks
        temb = timestep_embedding(t, self.ch)
        temb = self.temb1(F.silu(self.temb0(temb)))
        h = self.conv_in(x)
        skips = [h]
        for i in range(len(self.ch_mult)):
            for j in range(self.nrb):
                h = blk[f"down_{i}_res_{j}"](h, temb)
                if f"down_{i}_attn_{j}" in blk:
                    h = blk[f"down_{i}_attn_{j}"](h)
                skips.append(h)
            if i < len(self.ch_mult) - 1:
                h = blk[f"down_{i}_downsample"](h)
                skips.append(h)
        h = blk["mid_res_1"](blk["mid_attn"](blk["mid_res_0"](h, temb)), temb)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.nrb + 1):
                h = blk[f"up_{i}_res_{j}"](torch.cat([h, skips.pop()], dim=1), temb)
                if f"up_{i}_attn_{j}" in blk:
                    h = blk[f"up_{i}_attn_{j}"](h)
            if i > 0:
                h = blk[f"up_{i}_upsample"](
                    F.interpolate(h, scale_factor=2, mode="nearest")
                )
        return self.conv_out(F.silu(self.norm_out(h)))

    # -- the quantizable layers, by the Flax layer names (`tmpq layers`) ----------
    def qlayers(self) -> dict[str, nn.Module]:
        return {
            m.layer_name: m
            for m in self.modules()
            if isinstance(m, QConv2d | QLinear | QMatMul)
        }

    def set_order(self, order: str) -> None:
        if order not in ("fake", "aqt"):
            raise ValueError(f"order {order!r}: use 'fake' or 'aqt'")
        for m in self.qlayers().values():
            m.order = order

    def to_tensor_mode(self) -> None:
        """Quantizer scalars as 0-d buffers (for torch.compile: one graph serves
        every candidate). Call after moving the model to its device."""
        device = next(self.parameters()).device
        for m in self.modules():
            if isinstance(m, _Scalars):
                m.to_tensor_mode(device)


def load_flax_params(model: TorchUNet, params: Mapping) -> None:
    """Copies a Flax UNet param tree (numpy leaves) into `model`, strictly."""
    sd: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def walk(tree, path):
        for key, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, path + (key,))
                continue
            owner = ".".join(path)
            if path[0] in model.blocks:
                owner = "blocks." + owner
            m = modules[owner]
            a = np.asarray(v, np.float32)
            if isinstance(m, nn.Conv2d) and key == "kernel":
                a, key = a.transpose(3, 2, 0, 1), "weight"  # HWIO -> OIHW
            elif isinstance(m, nn.Linear) and key == "kernel":
                a, key = a.T, "weight"
            elif isinstance(m, nn.GroupNorm) and key == "scale":
                key = "weight"
            sd[f"{owner}.{key}"] = torch.from_numpy(np.array(a, np.float32, copy=True))

    walk(params, ())
    model.load_state_dict(sd, strict=True)


def configure(
    model: TorchUNet,
    layer_names: Sequence[str],
    kinds: Sequence[str],
    pinned_lhs_bits: Sequence[int],
    bit_widths: Sequence[int],
    act_bound: np.ndarray | None,
    w_clip: Sequence[torch.Tensor | None] | None,
    w_bits: Sequence[int] | None,
    a_bits: Sequence[int] | None,
) -> None:
    """Switches every layer to one candidate's bits (Python ints) and selects the
    calibrated results of those widths, as the supernet does. `w_bits`/`a_bits`
    None: every quantizer off (full precision). For layer i: conv/dense: a_bits[i]
    quantizes the input, w_bits[i] the kernel (clip ratio row w_clip[i][k]);
    matmul: a_bits[i] the left operand (pinned to the softmax width for `av`),
    w_bits[i] the right one; activation bounds act_bound[i, 0 | 1, k]."""
    layers = model.qlayers()
    widx = {int(b): k for k, b in enumerate(bit_widths)}
    for i, name in enumerate(layer_names):
        m = layers[name]
        if w_bits is None:
            if kinds[i] == "matmul":
                m.aq.set(None)
                m.bq.set(None)
            else:
                m.aq.set(None)
                m.wq.set(None)
            continue
        left = int(pinned_lhs_bits[i]) or int(a_bits[i])
        right = int(w_bits[i])
        bound = lambda side, bits, i=i: (
            1.0 if act_bound is None else float(act_bound[i, side, widx[bits]])
        )
        if kinds[i] == "matmul":
            m.aq.set(left, bound(0, left))
            m.bq.set(right, bound(1, right))
        else:
            m.aq.set(left, bound(0, left))
            clip = None if w_clip is None else w_clip[i][widx[right]]
            m.wq.set(right, clip)


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: np.ndarray,
) -> torch.Tensor:
    """DDIM (eta = 0) over ascending `timesteps`, exactly as the JAX sampler: a
    repeated timestep is a no-op step. Coefficients in float32."""
    ts = [int(t) for t in timesteps]
    t_seq = ts[::-1]
    t_prev = ([-1] + ts[:-1])[::-1]
    ab = lambda t: np.float32(1.0) if t < 0 else np.float32(alphas_cumprod[t])
    one = np.float32(1.0)
    x = x_T
    t_batch = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for t, tp in zip(t_seq, t_prev, strict=True):
        if t == tp:
            continue
        eps = model(x, t_batch.fill_(t))
        a_t, a_p = ab(t), ab(tp)
        x0 = (x - _f32(np.sqrt(one - a_t)) * eps) / _f32(np.sqrt(a_t))
        dir_xt = _f32(np.sqrt(np.maximum(one - a_p, np.float32(0.0)))) * eps
        x = _f32(np.sqrt(a_p)) * x0 + dir_xt
    return x


def enable_only(model: TorchUNet, names: set[str] | None) -> None:
    """Quantizers of the layers in `names` on (as configured), the others off;
    None: every configured quantizer on."""
    for name, m in model.qlayers().items():
        for q in (m.aq, getattr(m, "wq", None), getattr(m, "bq", None)):
            if q is not None:
                q.on = q.bits is not None and (names is None or name in names)
