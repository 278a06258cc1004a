"""disttrain bench scaling on a tiny budget: 1 rank and 2 ranks on two
network-namespace nodes (2 x 1), disttrain and PyTorch DDP side by side: the
table, the curves, the plots, real run folders, and a resumed study."""

import math
import os
import subprocess
import sys

import pytest

from disttrain.bench import scaling
from disttrain.data import digits
from disttrain.netns import NamespaceHosts, can_make_hosts


def test_efficiency_formula():
    assert scaling.scaling_efficiency(2.0, 4, 0.5) == 1.0  # 4 ranks, a quarter of the time: ideal
    assert scaling.scaling_efficiency(2.0, 2, 2.0) == 0.5  # 2 ranks, no faster: half
    assert math.isnan(scaling.scaling_efficiency(2.0, 2, math.nan))
    assert scaling.mean_epoch_time([5.0, 1.0, 2.0]) == 1.5  # the first (warm-up) epoch left out
    assert scaling.mean_epoch_time([5.0]) == 5.0
    # Per round (epochs 0-2, 3-5, 6-7), each round's first epoch left out; T(N) is the median of the rounds.
    times = [9.0, 1.0, 1.0, 9.0, 2.0, 2.0, 9.0, 7.0]
    assert scaling.round_epoch_times(times, [3, 6, 8]) == [1.0, 2.0, 7.0]
    assert scaling.study_epoch_time(times, [3, 6, 8]) == (2.0, [1.0, 2.0, 7.0])
    assert scaling.study_epoch_time([5.0, 1.0, 2.0], []) == (1.5, [])  # no record of rounds: the mean


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
        ("serial", "1"), ("disttrain", "1"), ("pytorch", "1"), ("pytorch", "2x1"), ("disttrain", "2x1")]  # interleaved
    assert offload == []
    n_train = len(digits(True))
    times = {(r["impl"], r["config"]): float(r["epoch_s"]) for r in rows}
    for r in rows:
        ranks = int(r["ranks"])
        assert r["status"] == "ok" and int(r["epochs"]) == 2, r
        assert (r["backend"], r["strategy"]) == {"disttrain": ("disttrain", "ddp"), "pytorch": ("gloo", "torch_ddp"),
                                                 "serial": ("disttrain", "none")}[r["impl"]]
        assert float(r["lr"]) == pytest.approx(0.05 * ranks) and int(r["global_batch"]) == 32 * ranks
        assert int(r["steps_per_epoch"]) == math.ceil(math.ceil(n_train / ranks) / 32)
        assert float(r["scaling_efficiency"]) == pytest.approx(times[(r["impl"], "1")] / (ranks * float(r["epoch_s"])))
        assert float(r["efficiency_vs_serial"]) == pytest.approx(times[("serial", "1")] / (ranks * float(r["epoch_s"])))
        assert len(r["epoch_s_rounds"].split()) == 1  # one round with --epochs
        assert 0 < float(r["test_loss"]) < 2.5 and float(r["best_val_loss"]) <= float(r["test_loss"])
        assert 0.1 < float(r["test_acc"]) <= 1
        run_dir = runs / f"{r['impl']}_{r['config']}"  # a real run folder of the trainer
        assert len(scaling.read_metrics(str(run_dir))) == 2 and (run_dir / "best_model.dts").exists()
        assert list((run_dir / "snapshots").glob("*.dts"))
    assert rows[1]["epoch_time_vs_pytorch"] != ""  # disttrain's row
    assert rows[0]["epoch_time_vs_pytorch"] == rows[2]["epoch_time_vs_pytorch"] == ""
    # The two implementations train the same thing: the same losses, epoch by epoch.
    loss = {(c["impl"], c["config"], c["epoch"]): float(c["train_loss"]) for c in curves}
    assert len(loss) == 10  # serial: the unwrapped model trains the same as DDP at one rank
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
    assert printed.count("finished earlier, kept") == 4 and "disttrain_2x1: 2 rank(s), resuming" in printed
    assert "resumed from" in (run_dir / "study.log").read_text()
    after = scaling.read_metrics(str(run_dir))
    assert [m["train_loss"] for m in after] == [m["train_loss"] for m in before]  # resumed, not started over
    # Another study's settings in the same folder: refused, nothing overwritten.
    with pytest.raises(SystemExit, match="other settings"):
        scaling.main([*argv[:4], "--epochs", "3", *argv[6:]])


def test_cluster_settings_from_slurm_and_flags():
    args = scaling.build_parser().parse_args(["--two-hosts", "2x4,4x4", "--time-budget", "60"])
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[001-004]", "MASTER_ADDR": "n001",
             "MASTER_PORT": "29700"}
    scaling.cluster_settings(args, slurm)
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (4, 1, "n001", 29700)
    rows = {c.name: c for c in scaling.configs(args)}
    assert {"serial_1", "disttrain_1", "pytorch_4", "disttrain_2x4", "pytorch_4x4"} <= set(rows)
    (cmd, _), = scaling._row_commands(args, rows["disttrain_4x4"], None, {})
    assert cmd[:8] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--max-restarts=0",
                       "--nnodes=4", "--node-rank=1", "--master-addr=n001"]
    assert cmd[8] == "--master-port=29701" and "--strategy" in cmd
    local = scaling.build_parser().parse_args([])
    scaling.cluster_settings(local, {})
    assert (local.nnodes, local.node_rank) == (1, 0)
    for argv, env, why in ((["--nnodes", "2"], {}, "--node-rank"),
                           (["--nnodes", "2", "--node-rank", "0"], {}, "address"),
                           (["--two-hosts", "8x1"], slurm, "2 to 4 nodes")):
        bad = scaling.build_parser().parse_args(argv)
        with pytest.raises(SystemExit, match=why):
            scaling.cluster_settings(bad, env)
            scaling.configs(bad)


def test_cluster_study_on_two_namespace_nodes(tmp_path):
    """The cluster path for real: one `disttrain bench scaling --nnodes 2 --node-rank N` per
    network-namespace node (as srun starts one per node); node 0 runs the one-host row alone,
    both run their part of the 2 x 1 row, node 0 writes the table."""
    why = can_make_hosts()
    if why:
        pytest.fail(f"the two nodes {why}")
    runs, out = tmp_path / "runs", tmp_path / "scaling.csv"
    with NamespaceHosts("dtclu", 81) as hosts:
        argv = [sys.executable, "-m", "disttrain.cli", "bench", "scaling", "--ranks", "1", "--two-hosts", "2x1",
                "--impls", "disttrain", "--no-serial", "--epochs", "1", "--no-offload", "--runs", str(runs),
                "--out", str(out), "--nnodes", "2", "--master-addr", hosts.addresses[0], "--master-port", "29640"]
        procs = [subprocess.Popen(hosts.command(n, [*argv, "--node-rank", str(n)]), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env={**os.environ, **hosts.env(n)})
                 for n in (0, 1)]
        outs = [procs[0].communicate(timeout=300)[0]]
        try:  # node 1 finishes with node 0 (or waits for it: not when node 0 failed)
            outs.append(procs[1].communicate(timeout=60 if procs[0].returncode == 0 else 1)[0])
        except subprocess.TimeoutExpired:
            procs[1].kill()
            outs.append(procs[1].communicate()[0])
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "node 1 of 2" in outs[1] and "node 0 writes the table" in outs[1] and "disttrain_1" not in outs[1]
    rows, _, _ = scaling.load_results(str(out))
    assert [(r["config"], r["nodes"], r["ranks"], r["status"]) for r in rows] == [("1", "1", "1", "ok"),
                                                                                ("2x1", "2", "2", "ok")]
    assert len(scaling.read_metrics(str(runs / "disttrain_2x1"))) == 1
    assert (runs / "disttrain_2x1" / "study.node1.log").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--two-hosts", "nope"], "--two-hosts 'nope': expected NODESxRANKS"),  # was a ValueError traceback
    (["--two-hosts", "2x0"], "--two-hosts '2x0': expected NODESxRANKS"),    # was a row of 0 ranks per node
    (["--two-hosts", "1x2"], "--two-hosts 1x2: two nodes only"),
    (["--slow-link", "abc"], "--slow-link 'abc': expected DELAY_MS,RATE_MBIT"),  # was found after the one-host rows
    (["--slow-link", "1,0"], "--slow-link '1,0'"),
    (["-m", "resnet9000"], "-m/--model 'resnet9000': unknown model; choose from resnet18"),  # was every row failed
    (["--dataset", "cifar10"], "--dataset cifar10 needs its data folder"),
    (["--runs", "/proc/disttrain-runs"], "--runs '/proc/disttrain-runs': cannot write in '/proc'"),
    (["--master-port", "70000"], "--master-port 70000"),
])
def test_bad_study_options_are_one_line_before_anything_runs(monkeypatch, tmp_path, capsys, argv, expected):
    import disttrain.bench
    from disttrain import cli

    def started(argv):  # a value the check lets through must not start the study here
        raise AssertionError(f"the study started: {argv}")

    monkeypatch.setattr(disttrain.bench, "main", started)

    runs = [] if "--runs" in argv else ["--runs", str(tmp_path / "runs")]
    assert cli.main(["bench", "scaling", "--ranks", "1", "--epochs", "1", "--out", str(tmp_path / "s.csv"),
                     *runs, *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("disttrain bench scaling: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started, no folder made


def test_study_progress_files_survive_an_interrupted_write(tmp_path, monkeypatch):
    import argparse
    import json

    args = argparse.Namespace(runs=str(tmp_path / "runs"), fresh=False, time_budget=None, epochs=1, model="mlp",
                              dataset="digits", data=None, batch_size=8, learning_rate=0.05, lr_scaling="linear",
                              seed=0, slow_link="")
    real_dump = json.dump

    def interrupted(value, f, **kwargs):  # half the file written, then the run is stopped
        f.write(json.dumps(value)[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scaling._prepare(args)
    monkeypatch.setattr(json, "dump", real_dump)
    scaling._prepare(args)  # was a JSONDecodeError traceback on the torn study.json
    with open(tmp_path / "runs" / "study.json") as f:
        assert json.load(f)["model"] == "mlp"
    assert os.listdir(tmp_path / "runs") == ["study.json"]
