"""What a searched genome changes in its images against the full-precision model.

`sample_sets` draws three sets from the same noise (one key, one batch size: image
i of every set starts from the same x_T): the genome's int8 model on its own
timesteps, the float model on the same timesteps, and the float model on the
uniform schedule of as many steps. `compare` summarises each set -- pixel
statistics (mean brightness, per-image contrast, near-black / near-white pixel
fractions), the `Evaluator`'s test-split scores in every evaluation space and the
feature net's class histogram -- and `changes` gives the genome's set minus each
float one. `plot` draws the figure; `run_compare` (`tmpq compare`) does it all and
writes `compare.json` and `compare.png` atomically.

Pixels are read in [0, 1]; contrast is an image's pixel standard deviation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from tmpq_jax import files
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.evaluation import Evaluator, default_eval_nets
from tmpq_jax.images import make_grid
from tmpq_jax.sampling import LoadedModel, sample, to_uint8

GENOME, FP_SAME, FP_UNIFORM = "genome", "fp_same_steps", "fp_uniform"
NEAR = 0.05  # a pixel <= NEAR is near-black, >= 1 - NEAR near-white
GRID = 36  # images per sample grid in the figure (6 x 6)
DEFAULT_NUM = {"cpu": 500, "accelerator": 2000}  # samples per set
JSON_FILE, PNG_FILE = "compare.json", "compare.png"


def default_num() -> int:
    """Samples per set: CPU-sized on a CPU (3 sets of 500: minutes on 2 cores)."""
    return DEFAULT_NUM["cpu" if jax.default_backend() == "cpu" else "accelerator"]


def _unit(images_u8: np.ndarray) -> np.ndarray:
    x = np.asarray(images_u8)
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        raise UserError(f"images {x.dtype}{list(x.shape)}: pass uint8 [N, H, W, C].")
    return x.astype(np.float32) / 255.0


def contrast(images_u8: np.ndarray) -> np.ndarray:
    """Each image's contrast: the standard deviation of its pixels, [N]."""
    x = _unit(images_u8)
    return x.reshape(len(x), -1).std(axis=1)


def mean_image(images_u8: np.ndarray) -> np.ndarray:
    """The per-pixel mean over the set, [H, W, C] in [0, 1]."""
    return _unit(images_u8).mean(axis=0)


def pixel_stats(images_u8: np.ndarray) -> dict:
    """Mean brightness, the per-image contrast distribution, near-black/white."""
    x = _unit(images_u8)
    c = x.reshape(len(x), -1).std(axis=1)
    p10, p50, p90 = np.percentile(c, [10, 50, 90])
    return {
        "num_images": len(x),
        "mean_brightness": float(x.mean()),
        "brightness_std_over_images": float(x.reshape(len(x), -1).mean(1).std()),
        "contrast": {
            "mean": float(c.mean()),
            "std": float(c.std()),
            "p10": float(p10),
            "p50": float(p50),
            "p90": float(p90),
        },
        "near_black_fraction": float((x <= NEAR).mean()),
        "near_white_fraction": float((x >= 1.0 - NEAR).mean()),
    }


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap of the two CDFs)."""
    grid = np.concatenate([a, b])
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


def changes(a: np.ndarray, b: np.ndarray, sa: dict, sb: dict) -> dict:
    """What set `a` changes against set `b` (same noise, image by image): a - b."""
    ma, mb = mean_image(a), mean_image(b)
    out = {
        "mean_brightness": sa["mean_brightness"] - sb["mean_brightness"],
        "contrast_mean": sa["contrast"]["mean"] - sb["contrast"]["mean"],
        "contrast_ks": _ks(contrast(a), contrast(b)),
        "near_black_fraction": sa["near_black_fraction"] - sb["near_black_fraction"],
        "near_white_fraction": sa["near_white_fraction"] - sb["near_white_fraction"],
        "mean_image_abs_diff_mean": float(np.abs(ma - mb).mean()),
        "mean_image_abs_diff_max": float(np.abs(ma - mb).max()),
    }
    if len(a) == len(b):  # the same noise: image i against image i
        out["paired_pixel_abs_diff"] = float(np.abs(_unit(a) - _unit(b)).mean())
    ha = sa.get("scores", {}).get("class_histogram")
    hb = sb.get("scores", {}).get("class_histogram")
    if ha and hb:
        out["class_histogram"] = {c: ha[c] - hb[c] for c in ha}
        out["class_total_variation"] = 0.5 * sum(abs(ha[c] - hb[c]) for c in ha)
    score_a, score_b = sa.get("scores", {}), sb.get("scores", {})
    out["scores"] = {
        k: score_a[k] - score_b[k]
        for k in score_a
        if k not in ("num_samples", "kid_std")
        and isinstance(score_a[k], float)
        and isinstance(score_b.get(k), float)
    }
    return out


def compare(
    sets: Mapping[str, np.ndarray],
    evaluator: Evaluator | None = None,
    real: np.ndarray | None = None,
    key: jax.Array | None = None,
) -> dict:
    """sets: name -> uint8 [N, H, W, C], the candidate (the genome's) first.
    Each set's pixel statistics and, with an evaluator, its test-split scores
    (`Evaluator.score`: every evaluation space and the class histogram);
    `changes[name]`: the first set minus set `name`; `test_split`: the pixel
    statistics of `real` images, when given."""
    if len(sets) < 2:
        raise UserError("compare needs a candidate set and at least one other.")
    names = list(sets)
    stats = {}
    for name in names:
        stats[name] = pixel_stats(sets[name])
        if evaluator is not None:
            stats[name]["scores"] = evaluator.score(sets[name], key)
    first = names[0]
    out = {
        "sets": stats,
        "changes": {
            n: changes(sets[first], sets[n], stats[first], stats[n]) for n in names[1:]
        },
    }
    if real is not None:
        out["test_split"] = pixel_stats(real)
    return out


def sample_sets(
    served: LoadedModel,
    lm: LoadedModel,
    timesteps,
    num: int,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The three sets, uint8, from one key (the same noise): the genome's int8
    model (`served`) and the float model `lm` on `timesteps`, and `lm` on the
    uniform schedule of as many steps."""
    key = jax.random.key(seed)
    ts = np.asarray(timesteps, np.int32)
    uniform = timestep_schedule("uniform", len(ts), lm.diffusion.num_timesteps)

    def draw(m, t):
        return to_uint8(sample(key, m, num, t, 0.0, batch_size, progress))

    return {
        GENOME: draw(served, ts),
        FP_SAME: draw(lm, ts),
        FP_UNIFORM: draw(lm, uniform),
    }


# --- the figure ---------------------------------------------------------------


def _label(name: str, result: dict) -> str:
    steps = len(result.get("timesteps", {}).get(name, ())) or "N"
    return {
        GENOME: "genome (int8), its steps",
        FP_SAME: "full precision, same steps",
        FP_UNIFORM: f"full precision, uniform {steps} steps",
    }.get(name, name)


def _scores_line(s: dict) -> str:
    keys = [("fid", "clf")]
    keys += [(k, k[len("fid_eval_") :]) for k in sorted(s) if k.startswith("fid_eval_")]
    keys += [("fid_pixels", "pixels")]
    return "FID " + ", ".join(f"{n} {s[k]:.2f}" for k, n in keys if k in s)


PIXELS = {"interpolation": "nearest"}  # pixels as pixels (and a small PNG)


def plot(result: dict, sets: Mapping[str, np.ndarray], path) -> Path:
    """compare.png: sample grids from the same noise (row 1), mean images and the
    candidate's difference to each other set (row 2), contrast histograms and
    class balance (row 3)."""
    names = list(sets)
    first, others = names[0], names[1:]
    fig = Figure(figsize=(3.3 * max(len(names), 4), 11.5), layout="constrained")
    rows = fig.subfigures(3, 1, height_ratios=[1.25, 1.0, 0.95])
    stats = result["sets"]

    ax = rows[0].subplots(1, len(names))
    for a, n in zip(np.atleast_1d(ax), names, strict=True):
        grid = make_grid(sets[n][:GRID])
        a.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", **PIXELS)
        a.set_title(_label(n, result), fontsize=9)
        if "scores" in stats[n]:
            a.set_xlabel(_scores_line(stats[n]["scores"]), fontsize=7.5)
        a.set_xticks([])
        a.set_yticks([])
    rows[0].suptitle("samples from the same noise (image i of each grid)", fontsize=10)

    means = {n: mean_image(sets[n]).mean(-1) for n in names}
    diffs = {n: means[first] - means[n] for n in others}
    top = max(float(m.max()) for m in means.values())
    lim = max(float(np.abs(d).max()) for d in diffs.values()) or 1e-3
    ax = rows[1].subplots(1, len(names) + len(others))
    for a, n in zip(ax[: len(names)], names, strict=True):
        im = a.imshow(means[n], cmap="gray", vmin=0.0, vmax=top, **PIXELS)
        s = stats[n]
        a.set_title(
            f"mean: {_label(n, result)}\nbrightness {s['mean_brightness']:.3f}",
            fontsize=8,
        )
    rows[1].colorbar(im, ax=ax[: len(names)], shrink=0.8, label="mean pixel")
    for a, n in zip(ax[len(names) :], others, strict=True):
        im = a.imshow(diffs[n], cmap="RdBu_r", vmin=-lim, vmax=lim, **PIXELS)
        c = result["changes"][n]
        a.set_title(
            f"{first} - {n}\n|diff| mean {c['mean_image_abs_diff_mean']:.4f}",
            fontsize=8,
        )
    rows[1].colorbar(im, ax=ax[len(names) :], shrink=0.8, label="difference")
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    rows[1].suptitle(
        "per-pixel mean image of each set, and the difference", fontsize=10
    )

    ax_c, ax_h = rows[2].subplots(1, 2, width_ratios=[1.0, 1.4])
    cs = {n: contrast(sets[n]) for n in names}
    bins = np.linspace(
        min(float(c.min()) for c in cs.values()),
        max(float(c.max()) for c in cs.values()) + 1e-6,
        31,
    )
    for i, n in enumerate(names):
        ax_c.hist(cs[n], bins, histtype="step", lw=1.6, color=f"C{i}", label=n)
        ax_c.axvline(cs[n].mean(), color=f"C{i}", ls=":", lw=1)
    if "test_split" in result:
        ax_c.axvline(
            result["test_split"]["contrast"]["mean"],
            color="k",
            ls="--",
            lw=1,
            label="test split mean",
        )
    ax_c.set_xlabel("per-image contrast (pixel std, [0, 1] scale)")
    ax_c.set_ylabel("images")
    ax_c.legend(fontsize=7)
    hists = {n: stats[n].get("scores", {}).get("class_histogram") for n in names}
    if all(hists.values()):
        classes = list(hists[first])
        x = np.arange(len(classes))
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [hists[n][c] for c in classes]
            ax_h.bar(
                x + (i - (len(names) - 1) / 2) * w, vals, w, label=n, color=f"C{i}"
            )
        ax_h.axhline(1 / len(classes), color="k", ls="--", lw=1, label="uniform")
        ax_h.set_xticks(x, classes, rotation=30, fontsize=7)
        ax_h.set_ylabel("fraction of samples")
        ax_h.legend(fontsize=7, ncol=2)
    else:
        ax_h.text(0.5, 0.5, "no class histogram (label-free feature net)", ha="center")
        ax_h.set_axis_off()
    ax_h.set_title("class balance (feature net's predicted class)", fontsize=9)
    ax_c.set_title("per-image contrast", fontsize=9)
    n_img = stats[first]["num_images"]
    fig.suptitle(f"{result.get('genome', first)}: {n_img} samples per set", fontsize=11)
    path = Path(path)
    return files.atomic_write(
        path,
        lambda p: fig.savefig(p, format="png", dpi=110, pil_kwargs={"optimize": True}),
    )


# --- the command --------------------------------------------------------------


def float_model(
    genome_path: str | os.PathLike, checkpoint=None, model_spec: str | None = None
) -> LoadedModel:
    """The float model a genome was searched on (as `load_genome_model` finds it)."""
    from tmpq_jax.genome_file import _load_json
    from tmpq_jax.sampling import load_model
    from tmpq_jax.user_model import load_source, resolve_model

    if checkpoint or model_spec:
        return resolve_model(checkpoint, model_spec)
    return load_source(_load_json(Path(genome_path)).get("model")) or load_model()


def _real_test_images(ev: Evaluator, data_dir) -> np.ndarray | None:
    """Fashion-MNIST's test images for a Fashion-MNIST feature net, else None."""
    from tmpq_jax.data import load_fmnist

    if ev.net.data_name not in (None, "fmnist") or tuple(ev.net.image_shape) != (
        28,
        28,
        1,
    ):
        return None
    try:
        return load_fmnist("test", data_dir).images
    except UserError:
        return None


def run_compare(
    genome_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num: int | None = None,
    seed: int = 0,
    *,
    checkpoint=None,
    model_spec: str | None = None,
    calibration=None,
    model: LoadedModel | None = None,
    evaluator: Evaluator | None = None,
    data_dir: str | None = None,
    batch_size: int = 500,
    progress: bool = False,
    command: str | None = None,
) -> dict:
    """Samples the three sets (`num` each; default `default_num()`), compares
    them, and writes `out_dir`/compare.json and compare.png. `model`: the float
    model in hand (else found as `load_genome_model` finds it); `evaluator`:
    default the shipped feature net and the evaluation nets made for the model."""
    from tmpq_jax.genome_file import _load_json
    from tmpq_jax.provenance import provenance
    from tmpq_jax.serving import load_genome_model

    t0 = time.perf_counter()
    if _load_json(Path(genome_path)).get("full_precision"):  # bad file: one line
        raise UserError(
            f"{genome_path} is a full-precision genome (timesteps searched on the "
            "float model): its images are the float model's on those steps, so "
            "there is no quantized model to compare; sample it with `tmpq sample`."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArgumentError("out_dir", f"{{arg}} {out} is a file; give a directory.")
    num = default_num() if num is None else int(num)
    lm = (
        model if model is not None else float_model(genome_path, checkpoint, model_spec)
    )
    if lm.prediction != "eps":
        raise UserError(
            f"{genome_path}: a {lm.prediction}-prediction (flow) model's genome; "
            "compare samples noise-prediction models with DDIM only."
        )
    ev = evaluator or Evaluator(None, data_dir, default_eval_nets(lm))
    ev.check_model(lm)
    ev.check_num_samples(num)  # before the long part
    served, genome = load_genome_model(genome_path, calibration=calibration, model=lm)
    sets = sample_sets(served, lm, genome.timesteps, num, seed, batch_size, progress)
    real = _real_test_images(ev, data_dir) if evaluator is None else None
    body = compare(sets, ev, real, jax.random.key(seed))
    uniform = timestep_schedule(
        "uniform", len(genome.timesteps), lm.diffusion.num_timesteps
    )
    meta = genome.meta
    result = {
        **provenance(command),
        "what": "what the genome's int8 model changes in its images against the "
        "full-precision model: the same noise, the genome's timesteps and the "
        "uniform schedule of as many steps; scores against the test split",
        "genome": str(genome_path),
        "num_samples": num,
        "num_samples_note": f"{num} samples per set (default {DEFAULT_NUM['cpu']} "
        f"on a CPU, {DEFAULT_NUM['accelerator']} on an accelerator); FID is biased "
        "upward at small N, so compare the sets of this file with each other, not "
        "with figures at other sample sizes",
        "seed": seed,
        "timesteps": {
            GENOME: [int(t) for t in genome.timesteps],
            FP_SAME: [int(t) for t in genome.timesteps],
            FP_UNIFORM: [int(t) for t in uniform],
        },
        "genome_bits": {
            "mean_w_bits": float(np.mean(np.asarray(genome.bits.w_bits))),
            "mean_a_bits": float(np.mean(np.asarray(genome.bits.a_bits))),
            "total_bitops": meta.get("total_bitops"),
        },
        "near_threshold": NEAR,
        **body,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    files.write_json(out / JSON_FILE, result)
    plot(result, sets, out / PNG_FILE)
    return result


def summary(r: dict) -> str:
    """A few lines for the terminal: each set's scores and pixel statistics."""
    lines = []
    for n, s in r["sets"].items():
        sc = s.get("scores", {})
        lines.append(
            f"{n:>14}: brightness {s['mean_brightness']:.4f}, contrast "
            f"{s['contrast']['mean']:.4f}, near-black {s['near_black_fraction']:.3f}"
            + (f"; {_scores_line(sc)}" if sc else "")
        )
    return "\n".join(lines)
