"""`tmpq search`, and its `--help` that lists every config key."""

from __future__ import annotations

import argparse
from pathlib import Path

from tmpq_jax.cli.flags import DEFAULT_CONFIG, add_model_flag

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


def add_parsers(sub) -> None:
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
    add_model_flag(r)
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
