"""Out-of-range inputs (issue 21): every prediction says which inputs lie inside what the logs
cover; outside, the time is the physical terms alone (loading, compute, communication) with a
wider interval, and the loader's worker count is reasoned about (none: loading not overlapped),
not learnt per logged value. The CLI's JSON and table carry the flags (the web page: test_advisor_web)."""

import json

import numpy as np
import pandas as pd
import pytest

from disttrain.advisor import Advisor, AdvisorInputError
from disttrain.advisor import cli as advise_cli

FLAGS = ["in_logs_workers", "in_logs_batch_size", "in_logs_num_of_gpus", "in_logs_gpu", "in_logs_model"]


@pytest.fixture(scope="module")
def advisor():
    return Advisor.fit(cache=True)


def _one(advisor, **config):
    base = {"model_name": "resnet50", "gpu": "P40", "batch_size": 512, "num_workers_data_loader": 4}
    return advisor.predict(pd.DataFrame([{**base, **config}])).iloc[0]


def _width(row):
    return np.log(row["epoch_time_s_high"] / row["epoch_time_s_low"])


def test_inside_the_logs_nothing_is_flagged(advisor):
    row = _one(advisor)
    assert row[FLAGS].all() and row["outside_logs"] == ""
    assert row["load_s"] > 0 and row["compute_s"] > 0 and row["comm_s"] == 0  # one GPU: no communication


def test_a_batch_beyond_the_logs_is_the_physical_terms_with_a_wider_interval(advisor):
    inside, outside = _one(advisor), _one(advisor, batch_size=2048)
    assert not outside["in_logs_batch_size"] and outside["outside_logs"] == "batch_size"
    assert outside[[f for f in FLAGS if f != "in_logs_batch_size"]].all()
    assert outside["epoch_time_s"] == pytest.approx(outside[["load_s", "compute_s", "comm_s"]].sum(), rel=1e-9)
    # Fewer steps of a fixed per-step cost: faster, never by more than the per-step share.
    assert outside["epoch_time_s"] < inside["epoch_time_s"]
    assert _width(outside) > _width(inside)


def test_loader_workers_are_reasoned_not_learnt(advisor):
    logged = _one(advisor)                               # single-process runs logged 4 workers
    none, eight = _one(advisor, num_workers_data_loader=0), _one(advisor, num_workers_data_loader=8)
    assert logged["in_logs_workers"] and not none["in_logs_workers"] and not eight["in_logs_workers"]
    # No workers: the loading runs in the training process, not overlapped: at least the 4 workers' whole work.
    assert none["load_s"] == pytest.approx(4 * logged["load_s"])
    assert eight["load_s"] == pytest.approx(logged["load_s"] / 2)  # twice the workers, twice as fast
    assert none["compute_s"] == pytest.approx(logged["compute_s"])
    assert none["epoch_time_s"] > logged["epoch_time_s"] > eight["epoch_time_s"]
    assert _width(none) > _width(logged) and _width(eight) > _width(logged)


def test_more_gpus_than_logged_pay_the_logged_all_reduce(advisor):
    four = _one(advisor, num_of_gpus=4, num_workers_data_loader=16, distribute_data=False, batch_size=128)
    eight = _one(advisor, num_of_gpus=8, num_workers_data_loader=16, distribute_data=False, batch_size=128)
    assert four["in_logs_num_of_gpus"] and not eight["in_logs_num_of_gpus"] and eight["outside_logs"] == "num_of_gpus"
    # The exposed all-reduce per step does not grow with the GPU count (the logs' 2, 3 and 4 GPUs
    # take the same time): 8 GPUs, each with the whole data set, pay what 4 do, with a wider interval.
    assert eight["comm_s"] > 0 and eight["comm_s"] == pytest.approx(four["comm_s"])
    assert eight["epoch_time_s"] == pytest.approx(eight[["load_s", "compute_s", "comm_s"]].sum(), rel=1e-9)
    assert _width(eight) > _width(four)


def test_a_gpu_without_logs_is_predicted_from_its_data_sheet_and_flagged(advisor):
    a100, p40 = _one(advisor, gpu="A100"), _one(advisor)
    assert not a100["in_logs_gpu"] and a100["outside_logs"] == "gpu"
    assert a100["epoch_time_s"] < p40["epoch_time_s"] and _width(a100) > _width(p40)
    with pytest.raises(AdvisorInputError, match="no epoch logs for GPU CPU"):
        _one(advisor, gpu="cpu")  # no data sheet on that scale: its runs, or --calibrate


def test_the_cli_carries_the_flags(tmp_path, capsys):
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu,price_per_gpu_hour\nA100,3.0\nP40,1.0\n")
    args = ["--model", "resnet50", "--target-acc", "0.7", "--gpus", "A100", "P40", "--prices", str(prices)]
    assert advise_cli.main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["configurations"]
    assert {r["gpu"]: r["outside_logs"] for r in rows} == {"A100": "gpu", "P40": ""}
    assert all(r["in_logs_gpu"] == (r["gpu"] == "P40") for r in rows)
    assert advise_cli.main(args + ["--top", "20"]) == 0
    table = capsys.readouterr().out
    assert "outside_logs" in table and " gpu\n" in table and " -\n" in table


def test_predict_reads_a_csvs_configurations(tmp_path, capsys):
    """--predict on CSVs in the logs' columns, on no calibrated device: the fitted model, flagged."""
    rows = pd.DataFrame([{"model_name": "resnet50", "gpu": "Tesla P40", "batch_size": 128, "epoch_timings": t,
                          "num_workers_data_loader": w} for w, t in ((4, 30.0), (4, 34.0), (0, 40.0))])
    (tmp_path / "runs.csv").write_text(rows.to_csv(index=False))
    assert advise_cli.main(["--predict", str(tmp_path / "runs.csv"), "--json"]) == 0
    logged, none = json.loads(capsys.readouterr().out)["configurations"]
    assert (logged["source"], logged["outside_logs"], logged["measured_s"]) == ("logs", "", 32.0)
    assert (none["source"], none["outside_logs"]) == ("physical terms (outside the logs)", "workers")
    assert none["epoch_time_s"] > logged["epoch_time_s"]
