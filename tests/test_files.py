"""Written files get the usual permissions (0o666 / 0o777 less the umask), and a
damaged or mismatched checkpoint is refused in one plain line."""

import os
import shutil
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import files
from tmpq_jax.checkpoint import load_params, restore_failure, save_model
from tmpq_jax.errors import UserError
from tmpq_jax.images import save_grid


@pytest.fixture
def umask():
    """Sets the process umask for a test, restoring it after."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_usual_permissions(umask, tmp_path, mask):
    umask(mask)
    assert files.umask() == mask
    # result.json / topk.json (write_json), archive.npz, the PNGs (plots and grids)
    files.write_json(tmp_path / "result.json", {"a": 1})
    files.atomic_write(tmp_path / "archive.npz", lambda p: np.savez(p, x=np.ones(2)))
    save_grid(np.zeros((4, 8, 8, 1), np.uint8), tmp_path / "best.png", nrow=2)
    for name in ("result.json", "archive.npz", "best.png"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name
    model = save_model(tmp_path / "model", {"w": jnp.ones(3)}, {"card": 1})
    assert _mode(model) == 0o777 & ~mask  # was mkdtemp's 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "archive.npz",
        "best.png",
        "model",
        "result.json",
    ]  # no temp files left


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tree = {"a": jnp.ones((4, 4)), "b": {"c": jnp.zeros(3)}}
    return save_model(tmp_path_factory.mktemp("ckpt") / "m", tree, {}), tree


def _refusal(path, like) -> str:
    with pytest.raises(UserError) as e:
        load_params(path, like)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for internal in ("driver", "tensorstore", "pybind", "bound method", "Error"):
        assert internal not in msg, msg
    return msg


def test_damaged_checkpoint_is_one_plain_line(model, tmp_path):
    path, tree = model
    np.testing.assert_array_equal(load_params(path, tree)["a"], 1.0)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    for f in (bad / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data: TensorStore's
            f.write_bytes(b"garbage")
    msg = _refusal(bad, tree)
    assert "unreadable (truncated or corrupt); export the model again" in msg
    shutil.rmtree(bad / "params")
    assert "nothing to restore" in _refusal(bad, tree)
    # what orbax raised for a newcomer's damaged checkpoint
    tensorstore = Exception(
        "Encountered error while reading array index: (slice(0, 3, 1),). See full "
        "TensorStore details: <bound method pybind11_detail_function_record_v1.spec>."
    )
    assert (
        restore_failure(tensorstore)
        == "its files are unreadable (truncated or corrupt)"
    )


# orbax leaves a pending read behind when it refuses a shape
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_of_another_shape_says_which(model):
    path, tree = model
    wider = {**tree, "a": jnp.ones((4, 5))}
    assert "stored with shape (4, 4), not the expected (4, 5)" in _refusal(path, wider)
    fewer = {"a": tree["a"]}
    assert "other arrays than expected ('b' differs)" in _refusal(path, fewer)
