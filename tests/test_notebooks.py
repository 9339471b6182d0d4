"""The example notebooks in examples/ run top to bottom, and are committed with their outputs.

Each notebook is executed in a fresh Jupyter kernel (the `python3` kernel of this environment),
from a copy in a temporary directory, and any cell that raises fails the test. The notebooks
assert what they teach (tensor shapes, the kernel against its reference), so a library change
that makes a notebook wrong, not only one that makes it crash, is caught here.
"""
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ldm.loader import DEFAULT_CHECKPOINT

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# Generous: the training notebook takes ~2 min on a quiet 2-core machine, but a cell that
# times out on a busy one would fail CI for no fault of the code.
CELL_TIMEOUT_S = 900
# The first code cell of every notebook: the one line a reader edits to use a real checkpoint.
CKPT_LINE = "CKPT = None  # None: the model shipped in weights/; or a path to a real SD 1.x checkpoint"


def test_every_notebook_is_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_architecture_tour.ipynb", "02_generating.ipynb", "03_training.ipynb",
                     "04_attention_kernel.ipynb", "05_prompts_embeddings_lora.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_outputs_and_the_default_checkpoint(path):
    """What a reader sees on the code host: every code cell run, in order, none failed, and the
    checkpoint left at the shipped model."""
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].source.startswith(CKPT_LINE), "the first code cell must set CKPT = None"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"cells not run once in order: {counts}"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"a saved output is an error: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"{DEFAULT_CHECKPOINT.name} is not in weights/: the notebooks run on the "
                    "shipped model (python -m ldm.train --preset tiny-shapes --out "
                    f"weights/{DEFAULT_CHECKPOINT.name} trains it)")
    if path.stem == "04_attention_kernel":
        pytest.importorskip("triton", reason="the kernel notebook needs Triton")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    finally:
        nbformat.write(nb, copy)  # the executed copy, to look at when a test fails
