"""Execute colabs/vqdiff_jax_tour.ipynb top to bottom in a Jupyter kernel.

The notebook's `parameters` cell is replaced by the tiny settings and a
temporary work and data directory. The kernel is this interpreter's `python3`
kernel, started with the repository root as its working directory so that
`vqdiff_jax` and `experiments` import even without an installed package. It
inherits this process's environment, including the eight simulated CPU devices
from conftest.py, so the trainers shard their batches as on an 8-chip host.
"""

import json
import os
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "colabs", "vqdiff_jax_tour.ipynb")
# Per cell. The slowest cell trains the tiny tokenizer, which took 1 to 1.5 minutes on a
# 2-core CPU shared with other jobs, mostly compiling.
CELL_TIMEOUT_S = 300
TINY_STEPS = 4  # num_train_steps of the 'tiny' tokenizer and DiT configs.
NUM_PLOT_CELLS = 7
KERNEL_PYTHON_MARKER = "kernel python: "


def _parameters_cells(nb):
    return [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]


def _has_png(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.outputs)


def _stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs
                   if output.get("output_type") == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(notebook after execution, work directory) of one tiny run."""
    root = tmp_path_factory.mktemp("colab")
    workdir, data_dir = str(root / "work"), str(root / "tfds")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = _parameters_cells(nb)
    parameters.source = f"TINY = True\nWORKDIR = {workdir!r}\nDATA_DIR = {data_dir!r}\n"
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import sys\nprint({KERNEL_PYTHON_MARKER!r} + sys.executable)"))

    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": REPO_ROOT}})
    client.execute()  # Raises CellExecutionError, with the traceback, if a cell fails.
    return nb, workdir


def test_notebook_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], cell.source[:80]
            assert cell.execution_count is None, cell.source[:80]


def test_notebook_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = _parameters_cells(nb)
    names = {line.split("=")[0].strip() for line in parameters.source.splitlines() if "=" in line}
    assert names == {"TINY", "WORKDIR", "DATA_DIR"}


def test_notebook_runs_without_errors(executed):
    nb, _ = executed
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [output for output in cell.outputs if output.output_type == "error"]
            assert errors == [], cell.source[:80]


def test_notebook_kernel_uses_this_python(executed):
    nb, _ = executed
    text = _stream_text(nb.cells[-1])
    assert KERNEL_PYTHON_MARKER + sys.executable in text


def test_notebook_every_plot_cell_shows_image(executed):
    nb, _ = executed
    plot_cells = [cell for cell in nb.cells if cell.cell_type == "code" and (
        "plt.show()" in cell.source or "plot_losses(" in cell.source)]
    assert len(plot_cells) == NUM_PLOT_CELLS
    for cell in plot_cells:
        assert _has_png(cell), cell.source[:80]


def test_notebook_trains_both_stages(executed):
    _, workdir = executed
    with open(os.path.join(workdir, "tokenizer", "eval_metrics.json")) as f:
        tok_metrics = json.load(f)
    assert tok_metrics["step"] == TINY_STEPS
    assert tok_metrics["num_images"] == 32  # num_eval_images of the tiny tokenizer config.
    assert os.path.isdir(os.path.join(workdir, "tokenizer", "checkpoints", str(TINY_STEPS)))
    assert os.path.isdir(os.path.join(workdir, "dit", "checkpoints", str(TINY_STEPS)))
    assert os.path.exists(os.path.join(workdir, "dit", "latents.npz"))


def test_notebook_prints_run_summaries(executed):
    nb, _ = executed
    text = "".join(_stream_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "'psnr':" in text
    assert f"'step': {TINY_STEPS}, 'resumed_from': 0" in text
    assert "sampler ddim with 4 steps" in text
