"""The host loop: compile once, run generations, checkpoint each one, resume.

The host only logs, draws the progress bar and saves: each generation is one call
of the compiled program (no per-candidate round trip). Orbax checkpoints the whole
`SearchState` after every generation; rerunning the same command resumes from the
latest one and ends with exactly the result of an uninterrupted run. A workdir
holding another search is refused, naming the keys that differ. Rerunning a
finished search returns its `result.json` as it is (`rescore=True` re-scores it
and rewrites the outputs).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.checkpoint import TrainCheckpoints
from tmpq_jax.distributed import is_main_process
from tmpq_jax.errors import UserError
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import LoadedModel
from tmpq_jax.search import racing
from tmpq_jax.search.config import SearchConfig, SearchRunConfig
from tmpq_jax.search.engine import SearchState
from tmpq_jax.search.setup import Setup, prepare, prepare_model

LOG_FILE = "search_log.jsonl"
RESULT_FILE = "result.json"


def signature(setup: Setup) -> dict:
    """What a checkpoint must agree on to be resumed."""
    search = {
        k: v
        for k, v in setup.run.search.to_dict().items()
        if k not in SearchConfig.RESUME_FREE
    }
    return {
        "search": search,
        "model_fingerprint": model_fingerprint(setup.lm.card),
        "calibration": str(setup.calibration_path),
        "feature_net": setup.assets.net.fingerprint(),
    }


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {vb!r} -> {va!r}")
    return out


def _generation_log(
    state: SearchState, gen: int, wall: float, evals: int, setup: Setup
) -> dict:
    """A row of the log. The FIDs are of the fully scored candidates (a race's
    dropped ones have prefix scores only); the work is in sample-forwards
    (samples scored x the forwards of each, `racing.forwards_per_sample`)."""
    a = jax.device_get(state.archive)  # replicated: every process reads its copy
    n = int(a.count[gen])
    samples = np.asarray(a.samples[gen, :n])
    full = samples == setup.run.search.num_samples
    fid = np.asarray(a.fid[gen, :n])
    fit = np.asarray(a.fitness[gen, :n])
    feasible = full & (fit <= fid * (1 + 1e-6))  # no penalty added
    best_all = np.asarray(a.fitness[: gen + 1]).min()
    per_sample = racing.forwards_per_sample(setup.engine.problem)
    return {
        "generation": gen,
        "evaluated": n,
        "evaluations_total": evals,
        "best_fitness_so_far": float(best_all),
        "best_fid_in_generation": float(fid[feasible].min())
        if feasible.any()
        else None,
        "mean_fid_in_generation": float(fid[full].mean()),
        "feasible": int(feasible.sum()),
        "raced_out": int((~full).sum()),
        "sample_forwards": int(samples.sum()) * per_sample,
        "sample_forwards_total": int(np.asarray(a.samples[: gen + 1]).sum())
        * per_sample,
        "wall_s": round(wall, 3),
    }


def read_log(workdir: str | Path) -> list[dict]:
    """The rows of a search's `search_log.jsonl`, one a generation ([] if none)."""
    path = Path(workdir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


class _Log:
    """search_log.jsonl, truncated to the restored generation on resume."""

    def __init__(self, path: Path, keep_below: int):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln and json.loads(ln)["generation"] < keep_below]
        path.write_text("".join(ln + "\n" for ln in kept))

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def _explained_device_errors(cfg):
    """A device error a setting causes, as a one-line UserError saying what to do.
    Vmapping several candidates turns each conv into a grouped conv; on an H100
    cuDNN rejects some group counts (5 at the paper's shapes,
    benchmarks/results/perf_layouts_p50.json) with CUDNN_STATUS_BAD_PARAM."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "CUDNN_STATUS_BAD_PARAM" in str(e) and cfg.candidate_chunk > 1:
            raise UserError(
                f"search.candidate_chunk={cfg.candidate_chunk}: cuDNN rejects the "
                "grouped convolutions that vmapping this many candidates makes; use "
                "1 (the default), 2 or 4."
            ) from e
        raise


def run_generations(
    setup: Setup,
    workdir: str | Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> SearchState:
    """Runs (or resumes) the search to `generations`; returns the final state.
    `stop_after`: return after that many generations done (tests, chunked runs)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = setup.run.search
    first, nxt = setup.engine.programs
    seed = np.int32(cfg.seed)  # numpy: replicated on every process
    ckpts = TrainCheckpoints(workdir / "checkpoints")
    sig = signature(setup)
    latest = ckpts.latest_step()
    try:
        if latest is None:
            state = None
        else:
            saved = ckpts.restore_meta(latest)
            diff = _diff(sig, saved.get("signature", {}))
            if diff:
                raise UserError(
                    f"{workdir} holds another search ({'; '.join(diff[:3])}); "
                    "use another --workdir or delete its checkpoints."
                )
            like = jax.eval_shape(first, setup.assets, seed)
            state, _ = ckpts.restore(latest, like, setup.engine.replicated)
        # Process 0 keeps the log; orbax has every process save its checkpoint part.
        main = is_main_process()
        log = _Log(workdir / LOG_FILE, keep_below=latest or 0) if main else None
        done = 0 if state is None else int(state.generation)
        end = (
            cfg.generations if stop_after is None else min(stop_after, cfg.generations)
        )
        evals = 0 if done == 0 else cfg.population + (done - 1) * cfg.offspring
        bar = tqdm(
            total=cfg.generations,
            initial=done,
            disable=not (progress and main),
            desc="search",
            unit="gen",
        )
        while done < end:
            t0 = time.perf_counter()
            with _explained_device_errors(cfg):
                if state is None:
                    # Committed, as a restored state is: the same compiled `next`
                    # serves a fresh run and a resumed one.
                    state = jax.device_put(
                        first(setup.assets, seed), setup.engine.replicated
                    )
                else:
                    state = nxt(setup.assets, state)
                jax.block_until_ready(state)
            gen = done
            done = int(state.generation)
            evals += cfg.population if gen == 0 else cfg.offspring
            ckpts.save(done, state, {"signature": sig, "generation": done})
            row = _generation_log(state, gen, time.perf_counter() - t0, evals, setup)
            if log is not None:
                log.append(row)
            bar.set_postfix(best=f"{row['best_fitness_so_far']:.3f}")
            bar.update(1)
        bar.close()
    finally:
        ckpts.close()
    return state


def finished_result(setup: Setup, workdir: str | Path) -> dict | None:
    """The `result.json` of this very search if `workdir` holds it finished: every
    generation checkpointed with this search's signature (model, calibration,
    feature net, config) and the outputs written with this exact config (so a
    changed `rescore_*` key re-scores). Else None."""
    workdir = Path(workdir)
    try:
        result = json.loads((workdir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    cfg = setup.run.search
    if not isinstance(result, dict) or result.get("search") != cfg.to_dict():
        return None
    if not (workdir / "checkpoints").is_dir():
        return None
    ckpts = TrainCheckpoints(workdir / "checkpoints")
    try:
        if ckpts.latest_step() != cfg.generations:
            return None
        saved = ckpts.restore_meta(cfg.generations)
    except UserError:
        return None  # the run itself says what is wrong with the checkpoint
    finally:
        ckpts.close()
    return None if _diff(signature(setup), saved.get("signature", {})) else result


def search(
    run: SearchRunConfig,
    workdir: str | Path,
    progress: bool = True,
    outputs: bool = True,
    model: LoadedModel | None = None,
    rescore: bool = False,
) -> dict:
    """The whole job: prepare, run (or resume) the generations, write the outputs;
    returns the result (`result.json`'s contents). `model`: search this one instead
    of `run.model` (e.g. your own linen model, `LoadedModel.from_module`; see
    `prepare_model`). A search `workdir` already holds finished is not run again:
    its result comes back as written, with `"reused": True` added (not in the file);
    `rescore=True` re-scores its top genomes and rewrites the outputs. A run's
    result also says where its time went: `seconds` (prepare, generations, outputs
    and the outputs' parts)."""
    from tmpq_jax.search.outputs import clock, write_outputs

    workdir = Path(workdir)
    progress = progress and is_main_process()  # one progress bar for all processes
    seconds = {}  # where this call's time went (not in result.json: reruns differ)
    with clock(seconds, "prepare"):
        if model is None:
            setup = prepare(run, workdir, progress)
        else:
            setup = prepare_model(run, model, workdir, progress=progress)
    if outputs and not rescore:
        done = finished_result(setup, workdir)
        if done is not None:
            return {**done, "reused": True}
    with clock(seconds, "generations"):
        state = run_generations(setup, workdir, progress)
    if not outputs:
        return {}
    with clock(seconds, "outputs"):  # which adds its parts' times too
        result = write_outputs(setup, state, workdir, progress, seconds=seconds)
    return {**result, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
