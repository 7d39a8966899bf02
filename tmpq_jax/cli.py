"""`tmpq` command line: train, sample, train-classifier, eval, layers, calibrate,
search, export, compare.

Config overrides follow ml_collections' flag style: `--config.train.num_steps=100`.
Every `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tmpq_jax.errors import ArgumentError, UserError

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist.py")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            body = a[len("--config.") :]
            if "=" not in body:  # `--config.key value`
                body = f"{body}={next(it, '')}"
            overrides.append(body)
        else:
            rest.append(a)
    return rest, overrides


def cmd_train(args, overrides) -> int:
    from tmpq_jax.config import load_config
    from tmpq_jax.train import train
    from tmpq_jax.train.loop import experiment_config

    cd = load_config(args.config, overrides)
    if args.data_dir:
        cd.data.data_dir = args.data_dir
    cfg = experiment_config(cd)  # a `flow` section: the DiT's flow matching
    card = train(cfg, args.workdir, progress=not args.no_progress)
    print(
        f"trained {card['steps']} steps; model exported to {Path(args.workdir) / 'model'}"
    )
    return 0


def cmd_sample(args, overrides) -> int:
    import jax

    from tmpq_jax.diffusion.schedules import timestep_schedule
    from tmpq_jax.images import save_grid, save_npz
    from tmpq_jax.sampling import sample, to_uint8
    from tmpq_jax.user_model import resolve_model

    if overrides:
        raise UserError(
            f"`tmpq sample` takes no --config overrides (got {overrides[0]!r})."
        )
    if not args.out and not args.npz:
        raise UserError(
            "nothing to write: give --out GRID.png and/or --npz SAMPLES.npz."
        )
    for p in (args.out, args.npz):  # check before the (long) sampling
        if p and not str(p).endswith((".png", ".npz")):
            raise UserError(
                f"{p}: use a .png path for --out and a .npz path for --npz."
            )
    if _is_flow_model(args.checkpoint, args.genome):
        return _sample_flow(args)
    if args.solver not in (None, "ddim"):  # a flow solver for a noise predictor
        from tmpq_jax.diffusion.flow import check_sampler

        check_sampler(args.solver, "eps")
    for flag, v in (("--class", args.label), ("--guidance", args.guidance)):
        if v is not None:
            raise UserError(
                f"{flag}: this model is an unconditional noise-prediction model; "
                "class labels and guidance need a class-conditional DiT."
            )
    if args.genome:  # the genome's timesteps and int8 weights (AQT SERVE)
        from tmpq_jax.serving import load_genome_model

        for flag, v in (("--steps", args.steps), ("--schedule", args.schedule)):
            if v is not None:
                raise UserError(
                    f"{flag}: a --genome carries its own timesteps; leave it out."
                )
        if args.dtype:
            raise UserError(
                "--dtype: the int8 model samples in float32; leave it out with --genome."
            )
        lm, genome = load_genome_model(
            args.genome,
            args.checkpoint,
            args.calibration,
            model_spec=args.model,
            pick=args.pick,
        )
        ts = genome.timesteps
        if args.pick is not None:
            print(
                f"--pick {args.pick:.4g}: the front's point of "
                f"{genome.meta['total_bitops']:.4g} total BitOPs, {len(ts)} steps"
            )
    else:
        for flag, v in (("--calibration", args.calibration), ("--pick", args.pick)):
            if v is not None:
                raise UserError(f"{flag} is only used with --genome.")
        lm = resolve_model(args.checkpoint, args.model)
        if args.dtype:
            lm = lm.with_dtype(args.dtype)
        T = lm.diffusion.num_timesteps
        schedule = args.schedule or "quad"
        ts = (
            None
            if schedule == "ddpm"
            else timestep_schedule(
                schedule, args.steps if args.steps is not None else 10, T
            )
        )
    imgs = to_uint8(
        sample(
            jax.random.key(args.seed),
            lm,
            args.num,
            ts,
            args.eta,
            args.batch_size,
            progress=not args.no_progress,
        )
    )
    if args.out:
        save_grid(imgs, args.out, nrow=args.nrow)
        print(f"wrote {args.out}")
    if args.npz:
        save_npz(imgs, args.npz, timesteps=ts if ts is not None else [])
        print(f"wrote {args.npz}")
    return 0


def _is_flow_model(checkpoint, genome=None) -> bool:
    """Whether the model to sample (--checkpoint, else the one a --genome names)
    is a flow model."""
    from tmpq_jax.checkpoint import read_card
    from tmpq_jax.diffusion.flow import prediction_of

    if not checkpoint and genome:
        from tmpq_jax.genome_file import _load_json
        from tmpq_jax.user_model import resolve_source

        checkpoint = resolve_source(_load_json(Path(genome)).get("model"))
    if not checkpoint:
        return False
    return prediction_of(read_card(checkpoint)) == "velocity"


def _sample_flow(args) -> int:
    """`tmpq sample` of an exported DiT: Euler / Heun, a class, guidance."""
    import jax

    from tmpq_jax.diffusion.flow import check_sampler
    from tmpq_jax.flow_sampling import sample_dit
    from tmpq_jax.images import save_grid, save_npz
    from tmpq_jax.models.dit import load_dit
    from tmpq_jax.sampling import to_uint8

    if args.schedule or args.eta or args.solver == "ddim":  # DDIM/DDPM's options
        check_sampler("ddpm" if args.schedule == "ddpm" else "ddim", "velocity")
    if args.dtype:
        raise UserError("--dtype: not available for a DiT; leave it out.")
    kw = dict(guidance=args.guidance, solver=args.solver or "euler")
    if args.genome:  # the genome's times, int8 weights and guidance
        cfg, params, kw = _flow_genome(args, kw)
    else:
        cfg, params, _ = load_dit(args.checkpoint)
    imgs = to_uint8(
        sample_dit(
            jax.random.key(args.seed),
            cfg,
            params,
            args.num,
            args.steps if args.steps is not None else 10,
            label=args.label,
            shift=args.shift,
            batch_size=args.batch_size,
            **kw,
        )
    )
    if args.out:
        save_grid(imgs, args.out, nrow=args.nrow)
        print(f"wrote {args.out}")
    if args.npz:
        save_npz(imgs, args.npz, timesteps=[])
        print(f"wrote {args.npz}")
    return 0


def _flow_genome(args, kw: dict):
    """(config, params, sample_dit's keywords) of a flow model's genome: its
    int8 model, time grid, solver and guidance (the flags override the last two)."""
    import numpy as np

    from tmpq_jax.diffusion.flow import gene_times, grid_from_times
    from tmpq_jax.serving import load_genome_model

    if args.steps is not None:
        raise UserError("--steps: a --genome carries its own times; leave it out.")
    lm, genome = load_genome_model(
        args.genome, args.checkpoint, args.calibration, model_spec=args.model,
        pick=args.pick,
    )  # fmt: skip
    s = genome.meta.get("sampler") or {}
    times = gene_times(np.asarray(genome.timesteps), lm.diffusion.num_timesteps)
    guidance = kw["guidance"] if kw["guidance"] is not None else s.get("guidance")
    return lm.config, lm.params, dict(
        guidance=None if guidance in (None, 1.0) else guidance,
        solver=args.solver or s.get("solver", "euler"),
        model_fn=lm.model_fn(lm.params),
        times=np.asarray(grid_from_times(times)),
    )


def cmd_train_classifier(args, overrides) -> int:
    from tmpq_jax.config import load_config
    from tmpq_jax.metrics import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig.from_configdict(load_config(args.config, overrides))
    card = train_classifier(
        cfg,
        args.workdir,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        data=args.data or "fmnist",
    )
    if card["objective"] == "labels":
        score = f"test accuracy {card['test_accuracy']:.4f}"
    else:
        score = f"held-out pair accuracy {card['test_pair_accuracy']:.4f} (SimCLR)"
    print(f"{score}; wrote {card['workdir']}")
    return 0


def cmd_eval(args, overrides) -> int:
    from tmpq_jax.evaluation import (
        Evaluator,
        default_eval_nets,
        evaluate_model,
        format_report,
    )
    from tmpq_jax.files import write_json
    from tmpq_jax.provenance import provenance
    from tmpq_jax.user_model import resolve_model

    if overrides:
        raise UserError(
            f"`tmpq eval` takes no --config overrides (got {overrides[0]!r})."
        )
    if args.json and not str(args.json).endswith(".json"):
        raise UserError(f"{args.json}: give a path ending in .json.")
    lm = resolve_model(args.checkpoint, args.model)
    if args.eval_net is not None:
        eval_nets = [] if args.eval_net == ["none"] else args.eval_net
    else:
        eval_nets = default_eval_nets(lm)
    ev = Evaluator(args.feature_net, args.data_dir, eval_nets)
    r = evaluate_model(
        ev,
        lm,
        args.steps,
        args.schedule,
        args.num_samples,
        args.seed,
        args.batch_size,
        progress=not args.no_progress,
    )
    print(format_report(r))
    if args.json:
        checkpoint = args.checkpoint or "checkpoints/fmnist_unet (shipped)"
        write_json(
            args.json, {**provenance(args.command_line), "checkpoint": checkpoint, **r}
        )
        print(f"wrote {args.json}")
    return 0


def cmd_layers(args, overrides) -> int:
    from tmpq_jax.quant import QuantBits, format_registry
    from tmpq_jax.quant.cost import bitops_per_step, model_size_bits
    from tmpq_jax.user_model import resolve_model

    if overrides:
        raise UserError(
            f"`tmpq layers` takes no --config overrides (got {overrides[0]!r})."
        )
    lm = resolve_model(args.checkpoint, args.model)
    reg = lm.layer_registry(check=False)  # lists what is left in float, refuses not
    print(format_registry(reg))
    for w, a in ((8, 8), (6, 6), (4, 8)):
        bits = QuantBits.uniform(reg, w, a)
        print(
            f"uniform W{w}A{a}: {float(bitops_per_step(bits, reg)) / 1e9:.2f} GBitOPs "
            f"per step per image, {float(model_size_bits(bits, reg)) / 8e6:.2f} MB weights"
        )
    return 0


def cmd_calibrate(args, overrides) -> int:
    from tmpq_jax.quant import save_calibration
    from tmpq_jax.quant.calibration import model_fingerprint
    from tmpq_jax.quant.solver import check_method, solve
    from tmpq_jax.quant.supernet import check_candidates
    from tmpq_jax.user_model import resolve_model

    if overrides:
        raise UserError(
            f"`tmpq calibrate` takes no --config overrides (got {overrides[0]!r})."
        )
    try:
        cands = tuple(int(b) for b in args.candidates.split(","))
    except ValueError:
        raise UserError(
            f"--candidates {args.candidates!r}: write bit-widths like 8,7,6,5."
        ) from None
    check_candidates(cands)
    if args.reconstruct and args.reconstruct_steps < 1:
        raise UserError(
            f"--reconstruct-steps {args.reconstruct_steps}: use at least 1."
        )
    check_method(args.method, args.reconstruct_steps if args.reconstruct else 0)
    lm = resolve_model(args.checkpoint, args.model)
    reg = lm.layer_registry()
    qparams, settings, info = solve(
        lm,
        args.seed,
        cands,
        args.timesteps,
        args.samples,
        reconstruct_steps=args.reconstruct_steps if args.reconstruct else 0,
        bias_correction=args.bias_correction,
        registry=reg,
        progress=not args.no_progress,
        method=args.method,
    )
    seconds = info["seconds"]
    if args.method != "minmse":
        import numpy as np

        m = args.method
        ratios = [r for rs in info[m]["gptq_over_rtn"].values() for r in rs]
        print(
            f"{m}: {info[m]['hessian_layers']} layers; output error on the "
            f"calibration set vs round-to-nearest, layer x width: median "
            f"{float(np.median(ratios)):.2f}x, worst {max(ratios):.2f}x; "
            f"{sum(map(len, info[m]['rtn_kept'].values()))} layer x width "
            "kept round-to-nearest (GPTQ did worse on held-out timesteps)"
        )
    if args.reconstruct:
        fits = info["reconstruction"]["fits"]
        kept = settings["reconstruct"]["fits_improved"]
        gains = [
            max(1.0, r["mse_min_mse"] / max(r["mse_reconstruction"], 1e-30))
            for r in fits
        ]
        print(
            f"reconstruction improved {kept} of {len(fits)} block x width "
            f"fits (block output MSE: median {sorted(gains)[len(gains) // 2]:.2f}x "
            f"lower, best {max(gains):.2f}x; the others keep their min-MSE values)"
        )
    path = save_calibration(
        args.out, qparams, reg, cands, settings, model_fingerprint(lm.card)
    )
    print(
        f"calibrated {len(reg)} layers x {len(cands)} widths ({settings['stage']}"
        f"{', bias-corrected' if settings['bias_correction'] else ''}) "
        f"in {seconds:.1f} s; wrote {path}"
    )
    return 0


def cmd_export(args, overrides) -> int:
    from tmpq_jax.quant.qwix_files import check_out
    from tmpq_jax.serving import load_genome_model

    if overrides:
        raise UserError(
            f"`tmpq export` takes no --config overrides (got {overrides[0]!r})."
        )
    if args.matmul_fallback != "refuse" and args.format != "qwix":
        raise UserError("--matmul-fallback applies to --format qwix only.")
    check_out(args.out)  # before the work: nothing is ever overwritten
    lm, genome = load_genome_model(
        args.genome, args.checkpoint, args.calibration, model_spec=args.model
    )
    if genome.meta.get("full_precision"):
        raise UserError(
            f"{args.genome} is a full-precision genome (timesteps searched on the "
            "float model): there is nothing to quantize; sample it with "
            "`tmpq sample --genome`."
        )
    if args.format == "aqt":
        from tmpq_jax.quant.export import save_quantized

        path = save_quantized(args.out, lm.params, lm.registry, genome.meta)
    else:
        from tmpq_jax.quant.qwix_export import to_qwix
        from tmpq_jax.quant.qwix_files import save_qwix_export

        export = to_qwix(
            lm.model,
            lm.params,
            lm.registry,
            lm.example_inputs(1),
            matmul_fallback=args.matmul_fallback,
        )
        path = save_qwix_export(args.out, export, genome.meta)
        floats = [r["name"] for r in export.layers if r["served"] == "float"]
        print(
            f"{len(export.rules)} Qwix rules for {len(export.layers)} ops"
            + (f"; served in float by Qwix: {', '.join(floats)}" if floats else "")
        )
    print(f"wrote {path}")
    return 0


def cmd_compare(args, overrides) -> int:
    from tmpq_jax.compare import run_compare, summary

    if overrides:
        raise UserError(
            f"`tmpq compare` takes no --config overrides (got {overrides[0]!r})."
        )
    r = run_compare(
        args.genome, args.out, args.num, args.seed, checkpoint=args.checkpoint,
        model_spec=args.model, calibration=args.calibration, data_dir=args.data_dir,
        batch_size=args.batch_size, progress=not args.no_progress,
        command=args.command_line,
    )  # fmt: skip
    print(f"{summary(r)}\nwrote {args.out}/compare.json and compare.png")
    return 0


DEFAULT_SEARCH_CONFIG = Path(DEFAULT_CONFIG).with_name("fmnist_search.py")


def _default_search_config() -> str:
    """The paper protocol on an accelerator, the reduced one on a CPU."""
    import jax

    cpu = jax.default_backend() == "cpu"
    name = "fmnist_search_cpu.py" if cpu else "fmnist_search.py"
    return str(DEFAULT_SEARCH_CONFIG.with_name(name))


def cmd_search(args, overrides) -> int:
    from tmpq_jax.distributed import init_distributed, is_main_process

    # Before anything touches a JAX backend (importing evosax does).
    init_distributed(
        args.coordinator_address, args.num_processes, args.process_id, args.distributed
    )
    from tmpq_jax import compilation_cache
    from tmpq_jax.config import load_config
    from tmpq_jax.evaluation import FID_NAME
    from tmpq_jax.search import SearchRunConfig, search

    compilation_cache.enable()  # a resume or another seed skips the compiles
    spec = args.config or _default_search_config()
    run = SearchRunConfig.from_configdict(load_config(spec, overrides))
    if is_main_process():
        s = run.search
        on = f"on {s.num_samples} samples"
        if s.race_samples:  # racing (search/racing.py)
            on = f"on {s.race_samples} samples, the best of a generation {on},"
        print(
            f"{spec}: {s.evaluations} genomes over {s.generations} generations, each "
            f"scored {on} x {s.num_steps} steps "
            f"({s.samples_scored * s.num_steps * s.forwards_per_step:,} model "
            "forwards).\n"
            "The bar moves once a generation (minutes each on a CPU; the first also "
            "compiles); interrupt any time and rerun to resume."
        )
    lm = None
    if args.model:
        from tmpq_jax.user_model import load_user_model

        lm = load_user_model(args.model)
    r = search(
        run, args.workdir, progress=not args.no_progress, rescore=args.rescore, model=lm
    )
    if not is_main_process():
        return 0
    rs = r["rescored"]
    print(
        f"best genome: {FID_NAME} {rs['fid']:.3f} on {rs['num_samples']} samples "
        f"({run.search.fitness} fitness {r['fid_search']:.3f} on the search's "
        f"{r['search_samples']}); "
        f"{r['total_bitops'] / 1e9:.2f} GBitOPs over {len(r['timesteps'])} steps "
        f"(budget {r['budget_bitops'] / 1e9:.2f}); timesteps {r['timesteps']}"
    )
    result = Path(args.workdir) / "result.json"
    if r.get("front"):
        f, wd = r["front"], Path(args.workdir)
        print(
            f"front: {f['points']} genomes, {min(f['total_bitops']) / 1e9:.2f} to "
            f"{max(f['total_bitops']) / 1e9:.2f} GBitOPs, in {wd / f['file']} "
            f"(tmpq sample --genome {wd / f['file']} --pick BITOPS serves one)"
        )
    if r.get("reused"):
        print(
            f"{args.workdir} holds this search finished: nothing run; the result is "
            f"{result} (--rescore re-scores its top genomes and rewrites the outputs)"
        )
    else:
        print(f"wrote {result} and plots in {args.workdir}")
    return 0


def _add_model_flag(p) -> None:
    p.add_argument(
        "--model",
        metavar="FILE.py:FACTORY",
        help="your own model: a factory returning (module, params, {'image_size': "
        "H, 'channels': C}); Linen or NNX (see tmpq_jax/user_model.py)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmpq", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train (or resume) a diffusion UNet, or a DiT (flow configs)"
    )
    t.add_argument("--config", default=DEFAULT_CONFIG, help="config .py file[:arg]")
    t.add_argument(
        "--workdir", required=True, help="checkpoints, log and exported model"
    )
    t.add_argument("--data-dir", help="directory of the Fashion-MNIST idx .gz files")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "sample", help="sample images from a model (default: the shipped one)"
    )
    s.add_argument(
        "--checkpoint", help="exported model dir (default: checkpoints/fmnist_unet)"
    )
    _add_model_flag(s)
    s.add_argument("--steps", type=int, help="DDIM steps (default 10)")
    s.add_argument(
        "--schedule", choices=["quad", "uniform", "ddpm"], help="(default quad)"
    )
    s.add_argument(
        "--genome",
        help="genome/result .json: sample its timesteps from its int8 model",
    )
    s.add_argument(
        "--calibration",
        help="with --genome: calibration dir (default: the one the genome names)",
    )
    s.add_argument(
        "--pick",
        type=float,
        metavar="BITOPS",
        help="with --genome front.json: the front's point with the most total "
        "BitOPs at or below BITOPS",
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    s.add_argument(
        "--solver", choices=["ddim", "euler", "heun"], help="euler/heun: a DiT's"
    )
    s.add_argument("--class", dest="label", type=int, help="a DiT's class label")
    s.add_argument("--guidance", type=float, help="a DiT's guidance scale (CFG)")
    s.add_argument("--shift", type=float, default=1.0, help="a DiT's time shift")
    s.add_argument("--num", type=int, default=100)
    s.add_argument("--nrow", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--dtype", choices=["float32", "bfloat16"])
    s.add_argument("--out", help="PNG grid path")
    s.add_argument("--npz", help="write uint8 samples to this .npz")
    s.add_argument("--no-progress", action="store_true")
    # Library arguments these flags set: their errors are reworded to name the flag.
    s.set_defaults(
        fn=cmd_sample,
        arg_flags={
            "num_steps": "--steps",
            "num": "--num",
            "calibration": "--calibration",
            "checkpoint": "--checkpoint",
            "model_spec": "--model",
            "guidance": "--guidance",
            "pick": "--pick",
        },
    )

    c = sub.add_parser("train-classifier", help="train the FID feature network")
    c.add_argument(
        "--config", default=str(Path(DEFAULT_CONFIG).with_name("classifier.py"))
    )
    c.add_argument("--workdir", required=True, help="where params, card and stats go")
    c.add_argument(
        "--data",
        help="an .npz of uint8 images (N,H,W[,C]), with `labels` or without (then "
        "a label-free SimCLR net); default: Fashion-MNIST",
    )
    c.add_argument("--data-dir", help="directory of the Fashion-MNIST idx .gz files")
    c.add_argument(
        "--overwrite", action="store_true", help="replace an existing workdir"
    )
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_train_classifier)

    e = sub.add_parser("eval", help="FID/KID/IS/class histogram of a model's samples")
    e.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    _add_model_flag(e)
    e.add_argument(
        "--feature-net", help="classifier dir (default: checkpoints/fmnist_classifier)"
    )
    e.add_argument(
        "--eval-net",
        action="append",
        help="an evaluation net dir (repeat for several; 'none' for none); default: "
        "the shipped ones made from the model's data (checkpoints/fmnist_eval_*)",
    )
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--schedule", choices=["quad", "uniform", "ddpm"], default="quad")
    e.add_argument("--num-samples", type=int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=1000)
    e.add_argument("--data-dir", help="Fashion-MNIST idx directory (test set, for KID)")
    e.add_argument("--json", help="also write the figures to this .json")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_eval, arg_flags={"num_steps": "--steps"})

    k = sub.add_parser(
        "calibrate", help="calibrate every layer for every candidate width"
    )
    k.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    _add_model_flag(k)
    k.add_argument("--out", required=True, help="calibration directory to write")
    k.add_argument("--candidates", default="8,7,6,5", help="candidate bit-widths")
    k.add_argument(
        "--timesteps", type=int, default=20, help="DDIM steps of the calibration set"
    )
    k.add_argument(
        "--samples", type=int, default=32, help="trajectories in the calibration set"
    )
    k.add_argument("--seed", type=int, default=0)
    k.add_argument(
        "--reconstruct",
        action="store_true",
        help="then block-wise output reconstruction (learned step sizes)",
    )
    k.add_argument(
        "--reconstruct-steps",
        type=int,
        default=300,
        help="Adam steps per block and width (with --reconstruct)",
    )
    k.add_argument(
        "--bias-correction",
        action="store_true",
        help="then store each layer's mean output error per width pair and "
        "subtract it (helps uniform widths; the search did worse with it, see "
        "docs/results.md)",
    )
    k.add_argument(
        "--method",
        default="minmse",
        help="weight rounding: minmse (round to nearest on min-MSE ranges, the "
        "default), gptq (GPTQ's error-feedback rounding per width, each layer on "
        "the float model's inputs, stored with the calibration), gptq_seq (GPTQ "
        "layer after layer on the quantized model's inputs), gptaq (gptq_seq "
        "aiming at the float output: later layers make up for earlier errors) or "
        "gptaq_clip (gptaq, clip ratios picked for output error); see docs/qwix.md",
    )
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(fn=cmd_calibrate, arg_flags={"num_steps": "--timesteps"})

    x = sub.add_parser(
        "export", help="a genome's int8 model, to serve with AQT (tmpq_jax) or Qwix"
    )
    x.add_argument("--genome", required=True, help="genome/result .json")
    x.add_argument(
        "--format",
        choices=["aqt", "qwix"],
        default="aqt",
        help="aqt: tmpq_jax's int8 export (default); qwix: Qwix PTQ rules + params "
        "(docs/qwix.md)",
    )
    x.add_argument("--out", required=True, help="a new (or empty) directory")
    x.add_argument("--checkpoint", help="exported model dir (default: the genome's)")
    _add_model_flag(x)
    x.add_argument(
        "--calibration", help="calibration dir (default: the one the genome names)"
    )
    x.add_argument(
        "--matmul-fallback",
        choices=["refuse", "float"],
        default="refuse",
        help="qwix: an attention matmul Qwix cannot serve at the genome's widths "
        "is refused (default) or served in float",
    )
    x.set_defaults(
        fn=cmd_export,
        arg_flags={
            "calibration": "--calibration",
            "checkpoint": "--checkpoint",
            "model_spec": "--model",
        },
    )

    m = sub.add_parser(
        "compare", help="what a genome changes in its images against full precision"
    )
    m.add_argument("--genome", required=True, help="genome/result .json")
    m.add_argument(
        "--num", type=int, help="samples per set (default 2000; 500 on a CPU)"
    )
    m.add_argument("--out", default="runs/compare", help="for compare.json/.png")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--checkpoint", help="exported model dir (default: the genome's)")
    _add_model_flag(m)
    m.add_argument("--calibration", help="default: the one the genome names")
    m.add_argument("--data-dir", help="Fashion-MNIST idx directory (test split)")
    m.add_argument("--batch-size", type=int, default=500)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(
        fn=cmd_compare,
        arg_flags={"num": "--num", "out_dir": "--out", "calibration": "--calibration",
                   "checkpoint": "--checkpoint", "model_spec": "--model"},
    )  # fmt: skip

    q = sub.add_parser("layers", help="list the quantizable layers (names for genomes)")
    q.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    _add_model_flag(q)
    q.set_defaults(fn=cmd_layers)
    _add_search_parser(sub)
    return p


_CONFIG_KEYS = object()  # `tmpq search --help`'s epilog, made when printed


class _SearchHelp(argparse.HelpFormatter):
    """Ends `tmpq search --help` with the config keys, one a line; they are read
    from the dataclasses only when help is printed (importing them imports JAX)."""

    _keys = None

    def add_text(self, text):
        if text is _CONFIG_KEYS:
            text = self._keys = _config_keys_help()
        super().add_text(text)

    def _fill_text(self, text, width, indent):
        if text is self._keys:  # a table: not refilled
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def _field_notes(cls) -> dict[str, str]:
    """The comment on each field's lines of a dataclass's source ({} if none)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
        toks = tokenize.generate_tokens(io.StringIO(src).readline)
        notes = {
            t.start[0]: t.string.lstrip("#").strip()
            for t in toks
            if t.type == tokenize.COMMENT
        }
        body = ast.parse(src).body[0].body
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    return {
        n.target.id: " ".join(
            notes[i] for i in range(n.lineno, n.end_lineno + 1) if i in notes
        )
        for n in body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def _config_keys_help() -> str:
    """Every key of a search config file with its default, from the dataclasses."""
    import dataclasses

    from tmpq_jax.search import config as search_config
    from tmpq_jax.search.config import SearchConfig, SearchRunConfig

    def shown(v):
        if isinstance(v, tuple | list):
            return f"({','.join(map(str, v))}{',' if len(v) == 1 else ''})"
        return v

    run_keys = {}
    for f in dataclasses.fields(SearchRunConfig):
        if f.name != "search" and f.default is not dataclasses.MISSING:
            run_keys[f.name] = f.default
        elif f.name != "search" and f.default_factory is not dataclasses.MISSING:
            run_keys[f.name] = f.default_factory()
    notes = {}
    # The settings may be fields of SearchConfig or of its groups.
    groups = getattr(search_config, "GROUPS", {})
    for cls in (SearchRunConfig, SearchConfig, *groups.values()):
        notes.update(_field_notes(cls))
    rows = [(f"--config.{k}={shown(v)}", notes.get(k, "")) for k, v in run_keys.items()]
    rows += [
        (f"--config.search.{k}={shown(v)}", notes.get(k, ""))
        for k, v in SearchConfig().to_dict().items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(
        [
            "config keys, set with --config.KEY=VALUE (shown at their defaults, the",
            "paper's protocol; the --config file may set others):",
            *(f"  {k:<{width}}  {note}".rstrip() for k, note in rows),
        ]
    )


def _add_search_parser(sub) -> None:
    r = sub.add_parser(
        "search",
        help="joint timestep + layer-wise bit search (default: the shipped model)",
        formatter_class=_SearchHelp,
        epilog=_CONFIG_KEYS,
    )
    r.add_argument(
        "--config",
        help="search config .py (default: configs/fmnist_search.py on an "
        "accelerator, configs/fmnist_search_cpu.py on a CPU)",
    )
    r.add_argument(
        "--workdir", default="runs/search", help="checkpoints, log, results, plots"
    )
    _add_model_flag(r)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "--rescore",
        action="store_true",
        help="re-score a finished search's top genomes and rewrite its outputs "
        "(without it, rerunning a finished search only prints its result)",
    )
    d = r.add_argument_group(
        "several processes (hosts)",
        "one process per host, all with the same command and --workdir on a "
        "filesystem they share; the search spans every device of every process",
    )
    d.add_argument(
        "--coordinator-address",
        help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)",
    )
    d.add_argument("--num-processes", type=int, help="default: $JAX_NUM_PROCESSES")
    d.add_argument(
        "--process-id", type=int, help="0..N-1, this process (default: $JAX_PROCESS_ID)"
    )
    d.add_argument(
        "--distributed",
        action="store_true",
        help="let JAX detect the processes (TPU pod slice, SLURM, Open MPI)",
    )
    r.set_defaults(fn=cmd_search)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.command_line = " ".join(["tmpq", *argv])  # recorded in result files
    try:
        return args.fn(args, overrides)
    except UserError as e:
        if isinstance(e, ArgumentError):  # the library's arguments, as flags
            e = e.renamed(getattr(args, "arg_flags", {}))
        print(f"tmpq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"tmpq {args.command}: interrupted; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
