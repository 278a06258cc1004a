"""Bad input at the command line: `disttrain train` and `disttrain bench`
check every option before any rank starts. A bad value is one line on stderr
that names it and what would be accepted, and exit status 2; nothing is
launched, so no launcher restarts a configuration error as if it were a crash."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from disttrain import cli, train_cli
from harness import package_pythonpath



def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=package_pythonpath())
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "disttrain.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def _one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_missing_data_folder_fails_before_any_rank_starts(tmp_path):
    """Tried by a new user: the ranks started, failed, were restarted three
    times (4 tracebacks) and torchrun's error report followed."""
    out = _run("train", "--nproc-per-node", "1", "-m", "resnet18", "--dataset", "cifar10", "-d", "/nonexistent",
               "-s", str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    line = _one_line(out.stderr)
    assert "'/nonexistent'" in line and "no such folder" in line and "-d/--data" in line
    assert "launching" not in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert not os.listdir(tmp_path)  # no run folder for a run that cannot start


def test_unknown_model_is_one_line_naming_the_choices(tmp_path):
    out = _run("train", "-m", "nosuchmodel", "-s", str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    line = _one_line(out.stderr)
    assert "'nosuchmodel'" in line and "resnet18" in line and "small_cnn" in line and "mlp" in line


def test_bench_bad_value_is_one_line():
    out = _run("bench", "ddp", "--ranks", "0,2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--ranks '0,2'" in _one_line(out.stderr) and out.stdout == ""


def _fake_cifar(folder, names=None):
    os.makedirs(folder)
    for name in names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\x80\x02")  # a pickle's first bytes: validation reads no more


def _train_error(capsys, argv):
    assert train_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _one_line(captured.err)
    assert line.startswith("disttrain train: error: "), line
    return line


@pytest.mark.parametrize("argv,expected", [
    (["-b", "0"], "-b/--batch-size 0: expected a whole number >= 1"),
    (["-b", "many"], "invalid int value: 'many'"),
    (["-e", "-1"], "-e/--epochs -1"),
    (["--time-budget", "0"], "--time-budget 0: expected a number > 0"),
    (["-lr", "nan"], "-lr/--learning-rate nan"),
    (["--momentum", "-0.5"], "--momentum -0.5"),
    (["--gamma", "0"], "--gamma 0"),
    (["--milestones", "3,x"], "--milestones '3,x'"),
    (["--keep-snapshots", "0"], "--keep-snapshots 0"),
    (["--snapshot-every", "-5"], "--snapshot-every -5"),
    (["-w", "-1"], "-w/--num-workers -1"),
    (["--image-size", "0"], "--image-size 0"),
    (["--timeout", "0"], "--timeout 0"),
    (["--timeout", "1e14"], "--timeout 1e+14: expected a number > 0 and <= 1e+09"),  # was timedelta's OverflowError
    (["--seed", str(2**64)], f"--seed {2**64}: expected a whole number >= 0 and <= {2**63 - 1}"),  # was torch's
    (["--nproc-per-node", "0"], "--nproc-per-node 0"),
    (["--max-restarts", "-1"], "--max-restarts -1"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--dataset", "cifar10"], "needs its data folder"),
    (["--dataset", "imagefolder", "-d", "/nonexistent"], "'/nonexistent': no such folder"),
    (["--zero-stage", "2"], "--zero-stage 2: applies to --strategy fsdp only"),
    (["--strategy", "zero"], "invalid choice: 'zero'"),
    (["--backend", "carrier-pigeon"], "--backend 'carrier-pigeon': not available here; choose from disttrain, gloo"),
    (["--save-name", "../escape"], "--save-name '../escape'"),
    (["--save-name", "/abs"], "--save-name '/abs'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_train_bad_option_values(tmp_path, capsys, argv, expected):
    line = _train_error(capsys, ["-s", str(tmp_path / "runs"), *argv])
    assert expected in line, line


def test_train_data_files_and_run_folder(tmp_path, capsys):
    _fake_cifar(str(tmp_path / "partial"), ["data_batch_1", "test_batch"])
    line = _train_error(capsys, ["--dataset", "cifar10", "-d", str(tmp_path / "partial"), "-s", str(tmp_path)])
    assert "data_batch_2, data_batch_3, data_batch_4, data_batch_5 not found" in line
    (tmp_path / "empty").mkdir()
    line = _train_error(capsys, ["--dataset", "imagefolder", "-d", str(tmp_path / "empty"), "-s", str(tmp_path)])
    assert "no class folders" in line
    (tmp_path / "empty" / "cat").mkdir()
    line = _train_error(capsys, ["--dataset", "imagefolder", "-d", str(tmp_path / "empty"), "-s", str(tmp_path)])
    assert "no images" in line
    # Not pickles (an HTML page saved under the name): each rank failed in pickle.load after the launch.
    os.makedirs(tmp_path / "html")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "html" / name).write_text("<html>Not Found</html>")
    line = _train_error(capsys, ["--dataset", "cifar10", "-d", str(tmp_path / "html"), "-s", str(tmp_path)])
    assert "data_batch_1' is not a CIFAR-10 python-pickle batch" in line
    (tmp_path / "file").write_text("x")
    line = _train_error(capsys, ["-s", str(tmp_path / "file")])
    assert "is a file, not a folder" in line
    # A file where the trainer makes its snapshots folder (a folder where it writes metrics.csv) was
    # a FileExistsError (IsADirectoryError) traceback from every rank after the launch.
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "snapshots").write_text("x")
    line = _train_error(capsys, ["-s", str(tmp_path / "runs"), "--save-name", "r"])
    assert "snapshots' is a file" in line and "--save-name" in line
    (tmp_path / "runs" / "r" / "snapshots").unlink()
    (tmp_path / "runs" / "r" / "metrics.csv").mkdir()
    line = _train_error(capsys, ["-s", str(tmp_path / "runs"), "--save-name", "r"])
    assert "metrics.csv' is a folder" in line


def test_train_configuration_file_entries(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    line = _train_error(capsys, ["-c", str(tmp_path / "missing.json"), "-s", runs])
    assert "missing.json" in line and "No such file" in line
    (tmp_path / "broken.json").write_text("[{")
    assert "is not JSON" in _train_error(capsys, ["-c", str(tmp_path / "broken.json"), "-s", runs])
    (tmp_path / "bad.json").write_text(json.dumps([{"model_name": "mlp", "colour": "blue"}]))
    assert "unknown keys ['colour']" in _train_error(capsys, ["-c", str(tmp_path / "bad.json"), "-s", runs])
    entries = [{"model_name": "mlp", "batch_size": 8}, {"config_index": 7, "model_name": "mlp", "batch_size": "8"}]
    (tmp_path / "types.json").write_text(json.dumps(entries))
    line = _train_error(capsys, ["-c", str(tmp_path / "types.json"), "-s", runs])
    assert "configuration 7" in line and "-b/--batch-size '8'" in line
    (tmp_path / "model.json").write_text(json.dumps([{"model_name": "resnet9000"}]))
    line = _train_error(capsys, ["-c", str(tmp_path / "model.json"), "-s", runs])
    assert "configuration 0" in line and "'resnet9000'" in line
    # Two entries in one folder: the second resumed (0 epochs, exit 0) or replaced the first.
    (tmp_path / "twice.json").write_text(json.dumps([{"model_name": "mlp"}, {"config_index": 0, "model_name": "mlp"}]))
    line = _train_error(capsys, ["-c", str(tmp_path / "twice.json"), "-s", runs])
    assert "configurations 0 and 1" in line and "'twice/config_0'" in line
    # The epoch logs' own file: distribute_data true is what the trainer does, false it cannot do.
    (tmp_path / "split.json").write_text(json.dumps([{"model_name": "mlp", "distribute_data": True},
                                                     {"model_name": "mlp", "distribute_data": False}]))
    assert "configuration 1" in _train_error(capsys, ["-c", str(tmp_path / "split.json"), "-s", runs])
    # Each file's runs in a folder named after it (another file's config_0 was this one's).
    (tmp_path / "sweep.json").write_text(json.dumps([{"model_name": "mlp", "distribute_data": True}]))
    _, checked = train_cli._checked_runs(["-c", str(tmp_path / "sweep.json"), "-s", runs])
    assert [run.save_name for run, _ in checked] == ["sweep/config_0"]
    _, checked = train_cli._checked_runs(["-c", str(tmp_path / "sweep.json"), "-s", runs, "--save-name", "mine"])
    assert [run.save_name for run, _ in checked] == ["mine/config_0"]


def test_a_stray_rank_variable_is_one_line(tmp_path, capsys, monkeypatch):
    # RANK left in the shell without WORLD_SIZE: disttrain.init's ValueError was a traceback.
    monkeypatch.setenv("RANK", "0")
    for var in ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert "RANK is set but WORLD_SIZE is not" in _train_error(capsys, ["-s", str(tmp_path), "-e", "1"])


def test_a_save_location_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    # '--save-location=~/runs' (no shell expansion after '=') made a folder named '~', as -d did not.
    monkeypatch.setenv("HOME", str(tmp_path))
    _, runs = train_cli._checked_runs(["--save-location=~/runs", "-m", "mlp"])
    assert runs[0][0].save_location == str(tmp_path / "runs")


def test_good_configurations_pass(tmp_path):
    _fake_cifar(str(tmp_path / "cifar"))
    for argv in (["-m", "mlp"], ["--dataset", "cifar10", "-d", str(tmp_path / "cifar"), "-m", "resnet18"],
                 ["--strategy", "fsdp", "--zero-stage", "2", "--milestones", "2,4", "-e", "0", "--seed", "7"]):
        args, runs = train_cli._checked_runs(["-s", str(tmp_path / "runs"), *argv])
        assert len(runs) == 1


def _bench_error(capsys, argv):
    assert cli.main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return _one_line(captured.err)


@pytest.mark.parametrize("argv,expected", [
    (["allreduce", "--factor", "1"], "-f/--factor 1: expected a whole number >= 2"),
    (["allreduce", "-b", "1M", "-e", "1K"], "larger than -e/--max-bytes"),
    (["allreduce", "--nproc", "0"], "--nproc 0"),
    (["allreduce", "--baseline", "mpich"], "--baseline 'mpich'"),
    (["ddp", "--ranks", "2,x"], "--ranks '2,x'"),
    (["ddp", "--models", "resnet19"], "unknown 'resnet19'; choose from resnet18, resnet18-tv, mlp"),
    (["ddp", "--configs", "torch@4/gloo"], "unknown 'torch@4/gloo'"),  # a bucket size is disttrain DDP's only
    (["ddp", "--configs", "disttrain@x/disttrain"], "unknown 'disttrain@x/disttrain'"),
    (["fsdp", "--configs", "disttrain@4/disttrain"], "unknown 'disttrain@4/disttrain'"),
    (["fsdp", "--configs", "zero4/disttrain"], "unknown 'zero4/disttrain'"),
    (["fsdp", "--steps", "0"], "--steps 0"),
    (["mpi", "--eval-ranks", "-1"], "--eval-ranks -1"),
    (["sampler", "--sizes", "1e6,0"], "--sizes '1e6,0'"),
    (["sampler", "--timeout", "-1"], "--timeout -1"),
    (["snapshot", "--sizes-mb", "0"], "--sizes-mb 0"),
    (["snapshot", "--dir", "/nonexistent"], "--dir '/nonexistent': no such folder"),
    (["strategies", "--grid", "0.1:1.5"], "--grid '0.1:1.5'"),
    (["strategies", "--processes", ""], "--processes ''"),
    (["strategies", "--epochs", "x"], "invalid int value: 'x'"),
])
def test_bench_bad_option_values(capsys, argv, expected):
    line = _bench_error(capsys, argv)
    assert line.startswith(f"disttrain bench {argv[0]}: error: ") and expected in line, line


def test_bench_ddp_bucket_size_configurations_pass():
    assert cli._check_bench(["ddp", "--configs", "disttrain@4/disttrain,disttrain-caller@0.5/disttrain,no-comm+copy"]) is None


@pytest.mark.parametrize("launcher", [False, True])
def test_bench_defaults_pass(monkeypatch, launcher):
    """Also from a shell that a launcher's variables leaked into: the benchmarks start their
    rows under their own torchrun (bench scaling's serial row refused --strategy none there)."""
    from disttrain.bench import BENCHMARKS

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if launcher:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    for name in BENCHMARKS:
        assert cli._check_bench([name]) is None, name


def _train(tmp_path, *args, env=None):
    environment = dict(os.environ, PYTHONPATH=package_pythonpath(),
                       **(env or {}))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "DISTTRAIN_SNAPSHOT_FAULT"):
        if var not in (env or {}):
            environment.pop(var, None)
    return subprocess.run([sys.executable, "-m", "disttrain.cli", "train", "--no-progress", "-e", "1",
                           "-s", str(tmp_path), "--save-name", "run", *args], capture_output=True, text=True,
                          timeout=300, env=environment)


def test_full_disk_and_another_model_are_one_line(tmp_path):
    # A full disk was a traceback (and the other writer's twin error a second report); a run folder
    # holding another model's snapshot was load_state_dict's page of missing and unexpected keys.
    full = _train(tmp_path, env={"DISTTRAIN_SNAPSHOT_FAULT": "enospc:5000"})
    assert full.returncode == 1, full.stdout + full.stderr
    line = _one_line(full.stderr)
    assert line.startswith("disttrain train: error: snapshot: cannot write") and "No space left" in line
    assert "resumes" in line
    done = _train(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    other = _train(tmp_path, "-m", "mlp")
    assert other.returncode == 1, other.stdout + other.stderr
    line = _one_line(other.stderr)
    assert "cannot resume from" in line and "another model ('small_cnn')" in line and "--no-resume" in line
    # Files that pass the checks before launch but cannot be read (a truncated batch) were a traceback.
    _fake_cifar(str(tmp_path / "cifar"))
    other = _train(tmp_path, "--dataset", "cifar10", "-d", str(tmp_path / "cifar"), "--save-name", "new")
    assert other.returncode == 1, other.stdout + other.stderr
    assert "data_batch_1' is not a CIFAR-10 python-pickle batch" in _one_line(other.stderr)
    # The same model on another data set went on in silence, its epochs labelled with the new one.
    from test_data import _cifar_batches

    (tmp_path / "real").mkdir()
    _cifar_batches(tmp_path / "real")
    other = _train(tmp_path, "--dataset", "cifar10", "-d", str(tmp_path / "real"))
    assert other.returncode == 1, other.stdout + other.stderr
    assert "trained on the data set 'digits', this run is on 'cifar10'" in _one_line(other.stderr)
    assert _train(tmp_path, "-m", "mlp", "--no-resume").returncode == 0


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    """Ctrl-C (SIGINT) in a one-process run was a KeyboardInterrupt traceback."""
    environment = dict(os.environ, PYTHONPATH=package_pythonpath())
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        environment.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "disttrain.cli", "train", "--no-progress", "-e", "1000", "-s",
                             str(tmp_path), "--save-name", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environment)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("disttrain train: interrupted"), err
    assert _train(tmp_path, "-e", "1").returncode == 0  # the run folder is whole: it resumes (and is done)


def test_sigterm_to_the_launching_command_reaches_the_ranks(tmp_path):
    # `disttrain train --nproc-per-node N` died of a SIGTERM at once (a scheduler's or `docker stop`'s,
    # sent to it alone), leaving torchrun and the ranks training on as orphans: no preemption snapshot.
    import signal
    import time

    from disttrain import snapshot

    env = dict(os.environ, PYTHONPATH=package_pythonpath())
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "DISTTRAIN_SNAPSHOT_FAULT"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "disttrain.cli", "train", "--no-progress", "-e", "1000",
                             "--nproc-per-node", "1", "--max-restarts", "0", "-s", str(tmp_path), "--save-name", "r"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    snapshots = tmp_path / "r" / "snapshots"
    try:
        deadline = time.monotonic() + 120
        while not snapshot.list_snapshots(snapshots) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert snapshot.list_snapshots(snapshots), "no epoch finished"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "preempted, snapshot saved" in out
    # Nothing trains on: the newest snapshot stays the newest.
    newest = snapshot.list_snapshots(snapshots)[-1]
    time.sleep(2)
    assert snapshot.list_snapshots(snapshots)[-1] == newest


def test_vision_transformers_fit_the_data_sets_images(tmp_path, capsys):
    # vit_small (built for 8x8) on CIFAR-10 and vit_base_patch32_224 (224x224) on anything else
    # failed in the first forward of every rank: "VisionTransformer: expects 8x8 images, got (32, 32)".
    import torch

    line = _train_error(capsys, ["-m", "vit_base_patch32_224", "-s", str(tmp_path)])
    assert "32x32 patches" in line and "8x8 images" in line
    model = train_cli.build_model("vit_small", 10, (3, 32, 32))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    _fake_cifar(str(tmp_path / "cifar"))
    train_cli._checked_runs(["-s", str(tmp_path), "-m", "vit_small", "--dataset", "cifar10", "-d",
                             str(tmp_path / "cifar")])


def test_strategy_none_with_more_ranks_is_refused_before_launch(tmp_path, capsys, monkeypatch):
    # --strategy none --nproc-per-node 2 passed the checks, launched 2 ranks that each raised the
    # Trainer's ValueError as a traceback, and torchrun restarted the job 3 times; under a launcher
    # of one's own each rank printed that traceback. Now one line, exit 2, nothing launched.
    line = _train_error(capsys, ["-s", str(tmp_path), "--strategy", "none", "--nproc-per-node", "2"])
    assert "--strategy none" in line and "2 ranks" in line, line
    for name in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = _train_error(capsys, ["-s", str(tmp_path), "--strategy", "none"])
    assert "--strategy none" in line and "3 ranks" in line, line
    monkeypatch.setenv("WORLD_SIZE", "1")
    train_cli._checked_runs(["-s", str(tmp_path), "--strategy", "none"])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    train_cli._checked_runs(["-s", str(tmp_path), "--strategy", "none", "--nproc-per-node", "1"])
