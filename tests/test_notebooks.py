"""The notebooks: committed without outputs, and run end to end in a kernel of this
interpreter with their small settings (TMPQ_NOTEBOOK_SMALL=1: minutes on 2 cores).

`python tests/test_notebooks.py` strips the outputs and execution counts of every
notebook in notebooks/ (what Jupyter's "Clear All Outputs" then save does).
"""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_bring_your_own_model.ipynb")
STRIP = "python tests/test_notebooks.py"
CELL_TIMEOUT_S = 900


def _dirty(nb: dict) -> bool:
    return any(
        c.get("outputs") or c.get("execution_count") is not None
        for c in nb["cells"]
        if c["cell_type"] == "code"
    )


def strip(path: Path) -> bool:
    """Removes outputs, execution counts and run metadata; True if it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for c in nb.cells:
        c.metadata.pop("execution", None)
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after if after.endswith("\n") else after + "\n")
    return after != before


def test_committed_notebooks_carry_no_outputs():
    assert {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} >= set(NOTEBOOKS)
    dirty = [
        p.name
        for p in sorted(NOTEBOOK_DIR.glob("*.ipynb"))
        if _dirty(json.loads(p.read_text()))
    ]
    if dirty:
        pytest.fail(
            f"outputs or execution counts in notebooks/{', notebooks/'.join(dirty)}; "
            f"strip them with `{STRIP}`.",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """A kernelspec for this very interpreter, first on JUPYTER_PATH (so no other
    `python3` kernel installed on the machine is picked up)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "tmpq-test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield "tmpq-test"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_small_settings(name, kernel_name, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("TMPQ_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TMPQ_NOTEBOOK_WORKDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError with the cell's traceback
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert images >= 4, f"{name}: only {images} images shown"


if __name__ == "__main__":
    paths = [Path(a) for a in sys.argv[1:]] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    for p in paths:
        print(f"{'stripped' if strip(p) else 'clean   '} {p}")
