"""The notebooks run from top to bottom without errors (each well under two minutes)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

import disttrain

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(disttrain.__file__)))


@pytest.mark.parametrize("name", ["model_results.ipynb", "dataloader_visualization.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    # The kernel imports the same disttrain as this test (installed, or the checkout's python/).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend puts plots in the outputs
    monkeypatch.delenv("DISTTRAIN_RUN_DIR", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
