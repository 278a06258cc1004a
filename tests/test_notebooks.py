"""Every notebook in notebooks/ runs top to bottom without an error, and shows
what it is there to show."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(outputs):
    return "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs)


def _images(outputs):
    return [o for o in outputs if "image/png" in o.get("data", {})]


def check_quickstart(outputs):
    assert "rank 1 (disttrain): [10.0, 12.0, 14.0, 16.0]" in _text(outputs)


def check_advisor(outputs):
    assert len(_images(outputs)) >= 2  # predicted-vs-measured and the learning curves
    text = _text(outputs)
    assert "time_mape_pct" in text and "cheapest:" in text


CHECKS = {"quickstart.ipynb": check_quickstart, "advisor.ipynb": check_advisor}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    CHECKS.get(os.path.basename(path), lambda outputs: None)(outputs)
