"""Two stored calibrations of one model compared layer by layer (issue 23: where
the GPU's gptaq calibration parts from the CPU's), and one spliced from both.

    python -m benchmarks.experiments.calibration_diff A B --out FILE.json
    python -m benchmarks.experiments.calibration_diff A B --splice 'attn.*/proj' --splice-out DIR

Per conv/dense layer and width: the largest difference of the stored weights
(`w_kernel`) in steps of that width's grid (A's channel absmax / (2**(b-1) - 0.5)),
both kernels' absmax and whether each is the model's own weight (round-to-nearest
kept); per layer the largest relative difference of the activation bounds.
`--splice REGEX` writes B with the layers whose names match taken from A, to be
scored as it is (e.g. `benchmarks.quant_uniform --workdir` over a copy of it).
"""

import argparse
import re
import shutil
from pathlib import Path

import numpy as np

from benchmarks.common import provenance, write_json


def _load(path, reg):
    from tmpq_jax.quant.calibration_io import load_calibration, read_calibration_meta

    cands = read_calibration_meta(path)["candidates"]
    return load_calibration(path, reg, cands)[0], cands


def _load_both(a, b, reg):
    """(A, B, candidates); SystemExit unless both were made for the same widths
    (their kernels are compared width by width)."""
    (qa, ca), (qb, cb) = _load(a, reg), _load(b, reg)
    if ca != cb:
        raise SystemExit(f"error: {a} is calibrated for {ca}, {b} for {cb}: compare "
                         "calibrations of the same candidate widths.")  # fmt: skip
    return qa, qb, ca


def _own_weights(lm, reg) -> dict:
    """{layer index: the model's own kernel} by the registry's param paths."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(lm.params)
    path = lambda layer: tuple(layer.param_path or ())
    return {i: np.asarray(flat[path(x)]) if path(x) in flat else None
            for i, x in enumerate(reg)}  # fmt: skip


def compare(a, b, cands, reg, own) -> list[dict]:
    rows = []
    bound_a, bound_b = np.asarray(a.act_bound), np.asarray(b.act_bound)
    for i, layer in enumerate(reg):
        rel = np.abs(bound_a[i] - bound_b[i]) / np.maximum(np.abs(bound_a[i]), 1e-9)
        row = dict(layer=layer.name, act_bound_rel_diff=float(rel.max()))
        if a.w_kernel is not None and a.w_kernel[i] is not None:
            ka, kb, w = np.asarray(a.w_kernel[i]), np.asarray(b.w_kernel[i]), own[i]
            axes = tuple(range(ka.ndim - 2))  # per output channel (the last axis)
            steps, same = [], []
            for k, bits in enumerate(cands):
                step = np.max(np.abs(ka[k]), axis=axes, keepdims=True) / (
                    2 ** (bits - 1) - 0.5
                )
                steps.append(
                    float(np.max(np.abs(ka[k] - kb[k]) / np.maximum(step, 1e-12)))
                )
                if w is not None:
                    same.append([bool(np.array_equal(x[k], w)) for x in (ka, kb)])
            row |= dict(grid_steps=steps, absmax=[float(np.abs(ka).max()), float(np.abs(kb).max())],
                        own_weight_kept=same)  # fmt: skip
        rows.append(row)
    return rows


def splice(src_a, src_b, out, pattern, reg) -> list[str]:
    """B with the layers matching `pattern` taken from A, saved at `out`."""
    from tmpq_jax.quant.calibration_io import read_calibration_meta, save_calibration

    a, b, cands = _load_both(src_a, src_b, reg)
    names = [n for n in reg.names if re.search(pattern, n)]
    pick = lambda fa, fb: tuple(
        x if name in names else y for name, x, y in zip(reg.names, fa, fb, strict=True)
    )
    qp = b.replace(
        w_kernel=pick(a.w_kernel, b.w_kernel), w_clip=pick(a.w_clip, b.w_clip)
    )
    meta = read_calibration_meta(src_b)
    if Path(out).exists():
        shutil.rmtree(out)
    settings = meta["settings"] | {"spliced": dict(layers=names, source=str(src_a))}
    save_calibration(out, qp, reg, cands, settings, meta.get("model_fingerprint"))
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--out", help="the comparison's JSON")
    ap.add_argument("--splice", help="regex of layer names taken from A into B")
    ap.add_argument("--splice-out", help="where the spliced calibration is written")
    args = ap.parse_args()
    from tmpq_jax.user_model import resolve_model

    lm = resolve_model()
    reg = lm.layer_registry()
    if args.splice:
        names = splice(args.a, args.b, args.splice_out, args.splice, reg)
        print(f"{args.splice_out}: {len(names)} layers from {args.a}: {names}")
    if args.out:
        a, b, cands = _load_both(args.a, args.b, reg)
        rows = compare(a, b, cands, reg, _own_weights(lm, reg))
        apart = [r["layer"] for r in rows if max(r.get("grid_steps") or [0]) > 10]
        result = provenance() | dict(
            a=str(args.a), b=str(args.b), candidates=cands,
            layers_over_10_grid_steps=apart, rows=rows,
        )  # fmt: skip
        print(write_json(Path(args.out).name, result, Path(args.out).parent))
        print("layers over 10 grid steps apart:", apart)


if __name__ == "__main__":
    main()
