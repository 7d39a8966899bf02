"""`tmpq`: train, sample, evaluate, quantize and search diffusion models.

Commands, a module each: train and train-classifier (train.py), sample
(sample.py), eval and compare (evaluate.py), layers, calibrate and export
(quantize.py), search (search.py).

Config overrides follow ml_collections' flag style: `--config.train.num_steps=100`.
Every `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from tmpq_jax.cli import evaluate, quantize, sample, search, train
from tmpq_jax.errors import ArgumentError, UserError


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmpq", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for commands in (train, sample, evaluate, quantize, search):
        commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.command_line = " ".join(["tmpq", *argv])  # recorded in result files
    try:
        if overrides and not hasattr(args, "config"):  # a command with no config file
            raise UserError(
                f"`tmpq {args.command}` takes no --config overrides "
                f"(got {overrides[0]!r})."
            )
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
