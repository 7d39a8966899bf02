"""`tmpq layers`, `tmpq calibrate` and `tmpq export`: a model's layers, their calibration, a genome's int8 model."""

from __future__ import annotations

from tmpq_jax.cli.flags import add_model_flag
from tmpq_jax.errors import UserError


def cmd_layers(args, overrides) -> int:
    from tmpq_jax.quant import QuantBits, format_registry
    from tmpq_jax.quant.cost import bitops_per_step, model_size_bits
    from tmpq_jax.user_model import resolve_model

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


def add_parsers(sub) -> None:
    k = sub.add_parser(
        "calibrate", help="calibrate every layer for every candidate width"
    )
    k.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    add_model_flag(k)
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
    add_model_flag(x)
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

    q = sub.add_parser("layers", help="list the quantizable layers (names for genomes)")
    q.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    add_model_flag(q)
    q.set_defaults(fn=cmd_layers)
