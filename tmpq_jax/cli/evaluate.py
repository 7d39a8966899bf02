"""`tmpq eval` (a model's sample quality) and `tmpq compare` (a genome against full precision)."""

from __future__ import annotations

from tmpq_jax.cli.flags import add_model_flag
from tmpq_jax.errors import UserError


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


def cmd_compare(args, overrides) -> int:
    from tmpq_jax.compare import run_compare, summary

    r = run_compare(
        args.genome, args.out, args.num, args.seed, checkpoint=args.checkpoint,
        model_spec=args.model, calibration=args.calibration, data_dir=args.data_dir,
        batch_size=args.batch_size, progress=not args.no_progress,
        command=args.command_line,
    )  # fmt: skip
    print(f"{summary(r)}\nwrote {args.out}/compare.json and compare.png")
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="FID/KID/IS/class histogram of a model's samples")
    e.add_argument("--checkpoint", help="exported model dir (default: the shipped one)")
    add_model_flag(e)
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
    add_model_flag(m)
    m.add_argument("--calibration", help="default: the one the genome names")
    m.add_argument("--data-dir", help="Fashion-MNIST idx directory (test split)")
    m.add_argument("--batch-size", type=int, default=500)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(
        fn=cmd_compare,
        arg_flags={"num": "--num", "out_dir": "--out", "calibration": "--calibration",
                   "checkpoint": "--checkpoint", "model_spec": "--model"},
    )  # fmt: skip
