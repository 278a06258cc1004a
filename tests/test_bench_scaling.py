"""disttrain bench scaling on a tiny budget: 1 rank and 2 ranks on two
network-namespace nodes (2 x 1), disttrain and PyTorch DDP side by side: the
table, the curves, the plots, real run folders, and a resumed study."""

import math
import os

import pytest

from disttrain.bench import scaling
from disttrain.data import digits
from disttrain.netns import can_make_hosts


def test_efficiency_formula():
    assert scaling.scaling_efficiency(2.0, 4, 0.5) == 1.0  # 4 ranks, a quarter of the time: ideal
    assert scaling.scaling_efficiency(2.0, 2, 2.0) == 0.5  # 2 ranks, no faster: half
    assert math.isnan(scaling.scaling_efficiency(2.0, 2, math.nan))
    assert scaling.mean_epoch_time([5.0, 1.0, 2.0]) == 1.5  # the first (warm-up) epoch left out
    assert scaling.mean_epoch_time([5.0]) == 5.0


def test_rounds_resume_each_configuration_to_a_growing_share_of_the_budget():
    args = scaling.build_parser().parse_args(["--ranks", "1,2", "--two-hosts", "", "--time-budget", "90"])
    cfg = scaling.configs(args)[0]
    budgets = [float(a[a.index("--time-budget") + 1]) * 3600
               for a in (scaling._train_argv(args, cfg, r / 3) for r in (1, 2, 3))]
    assert budgets == pytest.approx([30, 60, 90])
    epochs = scaling.build_parser().parse_args(["--epochs", "5"])
    assert [scaling._train_argv(epochs, cfg, f)[-1] for f in (1 / 3, 2 / 3, 1)] == ["2", "4", "5"]


def test_study_table_plots_and_resume(tmp_path, capsys):
    why = can_make_hosts()
    if why:
        pytest.fail(f"the 2 x 1 configuration {why}")
    runs, out = tmp_path / "runs", tmp_path / "results" / "scaling.csv"
    argv = ["--ranks", "1", "--two-hosts", "2x1", "--epochs", "2", "--runs", str(runs), "--out", str(out),
            "--no-offload"]
    assert scaling.main(argv) == 0
    rows, curves, offload = scaling.load_results(str(out))
    assert [(r["impl"], r["config"]) for r in rows] == [
        ("disttrain", "1"), ("pytorch", "1"), ("pytorch", "2x1"), ("disttrain", "2x1")]  # interleaved
    assert offload == []
    n_train = len(digits(True))
    times = {(r["impl"], r["config"]): float(r["epoch_s"]) for r in rows}
    for r in rows:
        ranks = int(r["ranks"])
        assert r["status"] == "ok" and int(r["epochs"]) == 2, r
        assert (r["backend"], r["strategy"]) == {"disttrain": ("disttrain", "ddp"),
                                                 "pytorch": ("gloo", "torch_ddp")}[r["impl"]]
        assert float(r["lr"]) == pytest.approx(0.05 * ranks) and int(r["global_batch"]) == 32 * ranks
        assert int(r["steps_per_epoch"]) == math.ceil(math.ceil(n_train / ranks) / 32)
        assert float(r["scaling_efficiency"]) == pytest.approx(times[(r["impl"], "1")] / (ranks * float(r["epoch_s"])))
        assert 0 < float(r["test_loss"]) < 2.5 and float(r["best_val_loss"]) <= float(r["test_loss"])
        assert 0.1 < float(r["test_acc"]) <= 1
        run_dir = runs / f"{r['impl']}_{r['config']}"  # a real run folder of the trainer
        assert len(scaling.read_metrics(str(run_dir))) == 2 and (run_dir / "best_model.dts").exists()
        assert list((run_dir / "snapshots").glob("*.dts"))
    assert rows[0]["epoch_time_vs_pytorch"] != "" and rows[1]["epoch_time_vs_pytorch"] == ""
    # The two implementations train the same thing: the same losses, epoch by epoch.
    loss = {(c["impl"], c["config"], c["epoch"]): float(c["train_loss"]) for c in curves}
    assert len(loss) == 8
    for (impl, config, epoch), value in loss.items():
        assert value == pytest.approx(loss[("pytorch", config, epoch)], rel=1e-5)
    for name in ("scaling_losses", "scaling_efficiency"):
        for ext in ("png", "svg"):
            assert (out.parent / f"{name}.{ext}").stat().st_size > 1000

    # An interrupted configuration: not marked finished, its newest snapshot not written yet.
    run_dir = runs / "disttrain_2x1"
    before = scaling.read_metrics(str(run_dir))
    (run_dir / "study.json").unlink()
    newest = max((run_dir / "snapshots").glob("*.dts"))
    newest.unlink()
    capsys.readouterr()
    assert scaling.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, kept") == 3 and "disttrain_2x1: 2 rank(s), resuming" in printed
    assert "resumed from" in (run_dir / "study.log").read_text()
    after = scaling.read_metrics(str(run_dir))
    assert [m["train_loss"] for m in after] == [m["train_loss"] for m in before]  # resumed, not started over
    # Another study's settings in the same folder: refused, nothing overwritten.
    with pytest.raises(SystemExit, match="other settings"):
        scaling.main([*argv[:4], "--epochs", "3", *argv[6:]])
