"""`tmpq sample`: a model's images, a genome's int8 model, a front's point, a flow DiT."""

from __future__ import annotations

from pathlib import Path

from tmpq_jax.cli.flags import add_model_flag
from tmpq_jax.errors import UserError


def cmd_sample(args, overrides) -> int:
    import jax

    from tmpq_jax.images import save_grid, save_npz
    from tmpq_jax.sampling import sample, to_uint8

    _check_outputs(args)
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
    lm, ts = _genome_model(args) if args.genome else _float_model(args)
    key, progress = jax.random.key(args.seed), not args.no_progress
    imgs = to_uint8(sample(key, lm, args.num, ts, args.eta, args.batch_size, progress))
    if args.out:
        save_grid(imgs, args.out, nrow=args.nrow)
        print(f"wrote {args.out}")
    if args.npz:
        save_npz(imgs, args.npz, timesteps=ts if ts is not None else [])
        print(f"wrote {args.npz}")
    return 0


def _check_outputs(args) -> None:
    """Refuses, before the (long) sampling, what could not be written."""
    if not args.out and not args.npz:
        raise UserError(
            "nothing to write: give --out GRID.png and/or --npz SAMPLES.npz."
        )
    for p in (args.out, args.npz):
        if p and not str(p).endswith((".png", ".npz")):
            raise UserError(
                f"{p}: use a .png path for --out and a .npz path for --npz."
            )


def _genome_model(args):
    """(model, timesteps) of --genome: its timesteps and int8 weights (AQT SERVE)."""
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
    return lm, ts


def _float_model(args):
    """(model, timesteps) without a genome: --steps on --schedule (None: DDPM)."""
    from tmpq_jax.diffusion.schedules import timestep_schedule
    from tmpq_jax.user_model import resolve_model

    for flag, v in (("--calibration", args.calibration), ("--pick", args.pick)):
        if v is not None:
            raise UserError(f"{flag} is only used with --genome.")
    lm = resolve_model(args.checkpoint, args.model)
    if args.dtype:
        lm = lm.with_dtype(args.dtype)
    schedule = args.schedule or "quad"
    if schedule == "ddpm":
        return lm, None
    steps = args.steps if args.steps is not None else 10
    return lm, timestep_schedule(schedule, steps, lm.diffusion.num_timesteps)


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
    return (
        lm.config,
        lm.params,
        dict(
            guidance=None if guidance in (None, 1.0) else guidance,
            solver=args.solver or s.get("solver", "euler"),
            model_fn=lm.model_fn(lm.params),
            times=np.asarray(grid_from_times(times)),
        ),
    )


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "sample", help="sample images from a model (default: the shipped one)"
    )
    s.add_argument(
        "--checkpoint", help="exported model dir (default: checkpoints/fmnist_unet)"
    )
    add_model_flag(s)
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
