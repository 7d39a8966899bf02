"""Orbax checkpoints: the training state (resumable) and exported models (params + card).

An exported model is a directory holding `params/` (orbax) and `card.json` (the
config it was built from plus provenance). Writes go to a temporary sibling that
is renamed into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tmpq_jax.errors import UserError
from tmpq_jax.files import default_mode

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_DIR = Path(os.environ.get("TMPQ_CHECKPOINTS", REPO_ROOT / "checkpoints"))
SHIPPED_MODEL = CHECKPOINTS_DIR / "fmnist_unet"


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Restore targets on `sharding` (default: this host's first device), whatever
    devices saved them.

    Without an explicit sharding orbax refuses a checkpoint written on another
    topology (e.g. trained on a GPU, restored on a CPU).
    """
    # local_devices: with several processes, devices()[0] is another host's.
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")


def save_tree_and_json(
    path: str | os.PathLike, tree_dir: str, tree: Any, json_file: str, meta: dict
) -> Path:
    """Writes an orbax `tree` and a JSON `meta` as one directory, atomically.

    Both go to a temporary sibling that replaces `path` only once complete: a
    crash or a failed write leaves the previous directory (or none) behind.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(default_mode(directory=True))  # mkdtemp makes it 0o700
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / tree_dir, tree)
        ckptr.wait_until_finished()
        _write_json(tmp / json_file, meta)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_model(path: str | os.PathLike, params: Any, card: dict) -> Path:
    """Writes params + card.json to `path` atomically (replacing what was there)."""
    return save_tree_and_json(path, "params", params, "card.json", card)


def read_card(path: str | os.PathLike) -> dict:
    path = Path(path)
    card_file = path / "card.json"
    if not card_file.is_file():
        if path.resolve() == SHIPPED_MODEL.resolve():
            raise UserError(
                f"the shipped model is not at {path}: it is read from the repository, "
                "so install with `pip install -e .` in a clone (not `pip install .`), "
                "or set TMPQ_CHECKPOINTS to the clone's checkpoints/ directory."
            )
        raise UserError(
            f"no model checkpoint at {path} (no card.json); train one with `tmpq train` "
            "or leave out --checkpoint to use the shipped model."
        )
    try:
        return json.loads(card_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"{card_file}: corrupt JSON ({e.msg}); re-export the model."
        ) from None


_SHAPES = re.compile(
    r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))"
)
_TREE_KEY = re.compile(r"tree structures do not match:\s*\n\s*(\S+?):?\s*\n")


def restore_failure(e: BaseException) -> str:
    """Why a restore failed, in plain words: orbax and TensorStore raise many types
    for missing, corrupt or mismatched data, with their internals in the text."""
    text = str(e)
    if isinstance(e, FileNotFoundError):
        return "nothing to restore there"
    if m := _SHAPES.search(text):
        return f"an array is stored with shape {m[2]}, not the expected {m[1]}"
    if "tree structures do not match" in text:
        m = _TREE_KEY.search(text)
        key = f" ({m[1]!r} differs)" if m else ""
        return f"it holds other arrays than expected{key}"
    return "its files are unreadable (truncated or corrupt)"


def restore_tree(directory: str | os.PathLike, like: Any, what: str, advice: str):
    """Restores an orbax tree shaped like `like`; any failure becomes one line:
    `{what}: {why}; {advice}` (`restore_failure`: never the library internals)."""
    try:
        return ocp.StandardCheckpointer().restore(
            Path(directory).resolve(), abstract(like)
        )
    except Exception as e:
        raise UserError(f"{what}: {restore_failure(e)}; {advice}") from None


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Restores params shaped like `like` (a pytree or its abstract version)."""
    return restore_tree(
        Path(path) / "params",
        like,
        f"{path}: cannot restore params",
        "export the model again, or load another.",
    )


class TrainCheckpoints:
    """A `CheckpointManager` over (state, meta json) with corrupt-data handling."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).resolve()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(
        self, step: int, like: Any, sharding: jax.sharding.Sharding | None = None
    ) -> tuple[Any, dict]:
        """(state shaped like `like` on `sharding` (see `abstract`), meta)."""
        try:
            r = self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract(like, sharding)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise UserError(
                f"{self.directory}/{step}: cannot restore the checkpoint: "
                f"{restore_failure(e)}; delete that step to resume from the one before "
                f"(or {self.directory} to start afresh)."
            ) from None
        return r.state, r.meta

    def restore_meta(self, step: int) -> dict:
        try:
            return self._mngr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as e:
            raise UserError(
                f"{self.directory}/{step}: cannot read the checkpoint's metadata: "
                f"{restore_failure(e)}; delete that step to resume from the one before "
                f"(or {self.directory} to start afresh)."
            ) from None

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
