"""Every notebook in notebooks/ runs top to bottom without an error, and shows
what it is there to show."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from harness import package_pythonpath

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


def check_plot(outputs):
    assert _images(outputs), "no plot was drawn"


def check_advisor(outputs):
    assert len(_images(outputs)) >= 2  # predicted-vs-measured and the learning curves
    text = _text(outputs)
    assert "time_mape_pct" in text and "cheapest:" in text


def check_strategies(outputs):
    assert len(_images(outputs)) >= 2  # the benchmark's loss curves and the Hogwild chart
    text = _text(outputs)
    assert "hogwild_local" in text and "ps_async" in text and "time_to_target_vs_ddp" in text
    assert "2 process(es) x 1 epoch(s) per process" in text


def check_dataloader(outputs):
    check_plot(outputs)
    assert "sampler: disttrain.sampler.DistributedSampler" in _text(outputs)  # never PyTorch's in its place


def check_scaling(outputs):
    assert len(_images(outputs)) >= 3  # loss curves, epoch time and efficiency, the offload study
    text = _text(outputs)
    assert "every configuration ran" in text and "scaling_efficiency" in text and "torch_ddp" in text
    assert "pinned" in text and "stage 3" in text


def check_decentralised(outputs):
    assert len(_images(outputs)) >= 2  # accuracy against wall time and against bytes
    text = _text(outputs)
    assert "target: DDP's final test accuracy" in text and "hivemind" in text and "bytes_ddp_over_this" in text


CHECKS = {"quickstart.ipynb": check_quickstart, "strategies.ipynb": check_strategies, "advisor.ipynb": check_advisor,
          "model_results.ipynb": check_plot, "dataloader_visualization.ipynb": check_dataloader,
          "scaling_study.ipynb": check_scaling, "decentralised.ipynb": check_decentralised}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The kernel imports the same disttrain as this test (installed, or the checkout's python/),
    # runs in a scratch folder, and is not mistaken for a rank of some job.
    monkeypatch.setenv("PYTHONPATH", package_pythonpath())
    # The advisor notebook's quick path: its evaluation runs at most 2 folds per split (every cell still runs).
    monkeypatch.setenv("DISTTRAIN_ADVISOR_MAX_FOLDS", "2")
    # The decentralised notebook plots the committed results of `disttrain bench decentralised`.
    monkeypatch.setenv("DISTTRAIN_BENCH_RESULTS", os.path.join(ROOT, "benchmarks", "results"))
    # The advisor notebook trains on the epoch logs shipped in the package (or on DISTTRAIN_EPOCH_LOGS if set).
    for var in ("MPLBACKEND", "DISTTRAIN_RUN_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    CHECKS.get(os.path.basename(path), lambda outputs: None)(outputs)
