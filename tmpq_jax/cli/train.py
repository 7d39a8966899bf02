"""`tmpq train` and `tmpq train-classifier`."""

from __future__ import annotations

from pathlib import Path

from tmpq_jax.cli.flags import DEFAULT_CONFIG


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


def add_parsers(sub) -> None:
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
