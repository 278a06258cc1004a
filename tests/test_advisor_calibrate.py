"""`disttrain advise --calibrate` (issue 21): measured on this machine, then a prediction for a
real `disttrain train` run on this machine lands within 20% of its measured epoch time. The run's
speed is controlled: the same again with every optimizer step slowed by a known 30 ms (the same
patch in the trainer's process and in the measuring one) must follow it, which
a fitted model that does not measure cannot (refitting on one short CPU run was off by 12x, and
once predicted a 10x slower copy faster). The trainer and `advise --predict` run as processes of
their own (each the command's main() in a child forked by a server that has already imported what
the commands import: PREDICT_SERVER); `advise --calibrate` runs in this one (main()).

The machine is shared (other tests, other jobs at a load of 10-25 on 2 cores): the load a few
seconds apart differs by 2x and more, so the prediction and the measurement are interleaved. One
long run of the trainer is paused (SIGSTOP) between stretches of RUN_EPOCHS epochs; while it is
paused, `disttrain advise --predict` measures the run's configuration (the stored timing dropped, so
it is timed anew, with the trainer's own epoch), then the run goes on (SIGCONT). Each prediction is compared
with the median of the run's epochs just before and just after it (an epoch that spans a pause is
left out), and the median of PREDICTIONS such ratios must be within 20% (when it is not, a second
run adds as many more, once, and the median of all must be).

Why single ratios stray (0.40 and 1.37 once, 0.69 and 2.50 at load 11): an epoch of this CNN is
60-80 ms of CPU, and on the 2 shared cores the process spends from 5% to 90% of its time waiting for
a CPU (run-queue wait, Linux's schedstat), changing from one second to the next. The test prints,
beside each ratio, that wait per second for the measurement (``cpu_wait_share``, which --predict
keeps with the timing) and for the run's stretches before and after it: a ratio above 1 comes with a
measurement that waited more than the run, one below 1 with one that waited less. The median of 3
holds where the wait changes under one of them. Both sides use one
thread (OMP_NUM_THREADS=1 in the run and in --predict, torch.set_num_threads(1) for --calibrate
here): with torch's two threads on the 2 busy cores, consecutive epochs of this CNN took 2.5 to
4.3 s (25-35x a one-thread epoch), which makes the test minutes long and no 20% bound meaningful."""

import contextlib
import csv
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import background
import disttrain
from harness import package_env, train_two_ranks
from disttrain.advisor import calibrate
from disttrain.advisor import cli as advise_cli

SLOW_STEP_S = 0.03
SLOWDOWN = f"""
import time
import torch.optim

_step = torch.optim.SGD.step


def _slow_step(self, *args, **kwargs):
    time.sleep({SLOW_STEP_S})
    return _step(self, *args, **kwargs)


torch.optim.SGD.step = _slow_step
"""


THREADS = 1
RUN_EPOCHS = 4   # clean epochs of the run between two predictions
# The slowed run's epochs are 0.4-0.5 s, most of it the known sleep: 2 between predictions (4 around
# each) hold its median as well, at half the wait.
SLOWED_RUN_EPOCHS = 2
# Predictions per run. Five were tried for the unslowed run (30 Nov 2026, five runs at load 9-13):
# their medians (0.80, 0.72, 1.23, 0.87, 0.95 for the first run of each) were no closer to 1 than
# those of their first three (0.80, 0.72, 1.12, 0.87, 1.08), since one trainer process's offset is
# shared by all its pairs, and each costs a process (seconds of the advisor's test time).
PREDICTIONS = 3
SLOWED_PREDICTIONS = 3
# How often this process looks for the run's next epoch. At 20 ms it woke 50 times a second beside
# the run, but never beside a measurement (it waits in subprocess.run then): on the 2 shared cores
# the run then waited longer for a CPU than the measurement did (run-queue wait per second 0.79-0.93
# against 0.56-0.97, in 5 of 6 pairs at load 18), and its epochs came out longer.
POLL_S = 0.2
# `disttrain advise --predict`'s processes come from a server started beside the run: it imports
# what the command imports (its dispatch, the advisor's CLI, pandas, torch, the trainer, the digits'
# loader, torch's optimizer machinery: 6-8 s of each --predict process's 9 s at load 6, 30 Nov 2026),
# then, for each prediction, forks a child that runs the command's main() (disttrain.cli.main, what
# `python -m disttrain` calls) with the command's arguments, and exits with its status: a process of
# its own, not pytest's, which measures as one started afresh does, without paying for the imports
# during the pauses. One server serves the module (its import, 4-8 s, paid once, beside the calibration): the slowed test's
# slowdown is applied in each child it forks for that test (``setup``). The trainer's run is such a child
# too, forked in the background (the server answers with its pid and goes on; the test pauses, resumes
# and ends it by its pid): `disttrain train`'s main() in a process of its own, started without the
# seconds of its imports (each run's start had cost them, twice a module, and more on a retry).
PREDICT_SERVER = r"""
import json, os, sys, traceback
import pandas, sklearn.datasets, torch, torch._dynamo, torch.distributed, torch.optim
import disttrain.cli, disttrain.advisor.cli, disttrain.advisor.calibrate, disttrain.advisor.loading
import disttrain.data, disttrain.distributed, disttrain.trainer, disttrain.train_cli
# One thread here (no pool or helper started by the imports), so a fork copies nothing half-held.
threads = len(os.listdir("/proc/self/task"))
print(f"ready {threads}", flush=True)
background = set()  # runs forked in the background: reaped once they have exited
for line in sys.stdin:
    argv, out, err, setup, cache, behind = json.loads(line)
    background -= {p for p in background if os.waitpid(p, os.WNOHANG)[0]}
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                   (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                os.dup2(os.open(path, mode, 0o600), fd)
            os.environ["DISTTRAIN_ADVISOR_CACHE"] = cache  # the test's, when it set one of its own
            exec(setup, {})  # the slowed test's slowdown, in its run and its measuring processes
            sys.argv = ["disttrain", *argv]
            code = disttrain.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if behind:
        background.add(pid)
        print(pid, flush=True)
        continue
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


def _reply(server, timeout):
    """The server's next line (its readiness, or a child's exit status); '' when it sent none in time."""
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    return server.stdout.readline() if ready else ""


class PredictServer:
    """PREDICT_SERVER, started once for the module; ``wait_ready`` on first use."""

    def __init__(self, folder):
        self.log = open(folder / "predict_server.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", PREDICT_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=package_env(THREADS), cwd=folder)
        self.ready = False
        self.setup = ""  # Python run in each forked child before the command (the slowed test's slowdown)

    def wait_ready(self):
        if self.ready:
            return
        ready = _reply(self.proc, 300)
        self.log.seek(0)
        assert ready.startswith("ready "), self.log.read()[-3000:]
        assert ready.split()[1] == "1", f"the predict server runs {ready.split()[1]} threads: a fork is not safe"
        self.ready = True

    def run(self, argv, out, err, background=False):
        """The command's exit status, from a child forked for it (its output in ``out`` and ``err``);
        with ``background``, the child's pid, at once (it runs on; the server reaps it once it exits)."""
        cache = os.environ["DISTTRAIN_ADVISOR_CACHE"]  # conftest's, or the test's own (monkeypatch)
        self.proc.stdin.write(json.dumps([argv, str(out), str(err), self.setup, cache, background]) + "\n")
        self.proc.stdin.flush()
        return _reply(self.proc, 300)

    def close(self):
        self.proc.kill()  # it holds nothing (its children have ended): no slow interpreter exit to wait for
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.log.close()


def _rows(metrics):
    try:
        with open(metrics) as f:
            return [float(row["epoch_timings"]) for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


def _running(pid):
    """Whether process ``pid`` runs (or is paused); False once it has exited (gone, or a zombie
    that the server has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _end(pid, timeout):
    """Waits up to ``timeout`` s for ``pid`` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(pid)


def _interleaved(folder, predict, server, slowed=False, count=PREDICTIONS):
    """A real CPU run of the trainer (small CNN on the digits, batch 128; a child of ``server``,
    its slowdown applied when ``slowed``), paused for each of
    ``count`` calls of ``predict(metrics, server, files)`` (a --predict process forked by ``server``,
    its output in files.out and .err; each returns the predicted epoch and the
    measurement's CPU wait share); returns (prediction, measured, the run's wait share in the
    stretch before, after) tuples, measured the
    median of the run's epochs just before and just after the prediction (its first epoch, which
    warms up, and any epoch that spans a pause left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "cpu_digits" / "metrics.csv"
    log = folder / "train.err"
    server.wait_ready()
    pid = int(server.run(["train", "-e", "100000", "-b", "128", "-s", str(folder), "--save-name", "cpu_digits",
                          "--no-progress"], folder / "train.out", log, background=True))
    stretches, predictions = [], []
    waits: list = []    # (when, the run's scheduler times) at each pause
    resumed: list = []  # the same at each resume
    try:
        deadline = time.monotonic() + 600
        clean_from = 1  # the run's first epoch warms up
        for i in range(count + 1):
            while len(_rows(metrics)) < clean_from + (SLOWED_RUN_EPOCHS if slowed else RUN_EPOCHS):
                assert _running(pid) and time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else ""
                time.sleep(POLL_S)
            os.kill(pid, signal.SIGSTOP)
            rows = _rows(metrics)  # read while paused: epoch len(rows) is the one the pause falls in
            stretches.append(rows[clean_from:])
            waits.append((time.monotonic(), calibrate.scheduler_threads(pid)))
            clean_from = len(rows) + 1
            if i < count:
                predictions.append(predict(metrics, server, folder / f"predict{i}"))
            os.kill(pid, signal.SIGCONT)
            resumed.append((time.monotonic(), calibrate.scheduler_threads(pid)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)  # the trainer's preemption: a snapshot, then exit
        if not _end(pid, 120):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _end(pid, 30)
    shares = [_wait_share(resumed[i - 1] if i else None, waits[i]) for i in range(len(waits))]
    return [(predicted, float(np.median(stretches[i] + stretches[i + 1])), shares[i], shares[i + 1])
            for i, predicted in enumerate(predictions)]


def _wait_share(start, end):
    """The run's run-queue wait per second between a resume and the next pause (None: unknown)."""
    spent = None if start is None else calibrate.scheduler_delta(start[1], end[1])
    return None if spent is None or end[0] <= start[0] else spent[1] / (end[0] - start[0])


def _median_ratio(pairs):
    return float(np.median([p[0] / m for p, m, *_ in pairs]))


def _interleaved_twice(folder, predict, server, slowed=False, bound=0.2, count=PREDICTIONS):
    """_interleaved's pairs; when their median ratio misses ``bound``, a second run's pairs are
    added (once) and the median is taken over all of them. Single ratios stray on this shared 2-core
    machine (0.40 and 1.87 seen beside 1.0s); a prediction that is really off still fails."""
    pairs = _interleaved(folder / "first", predict, server, slowed, count)
    if abs(_median_ratio(pairs) - 1) >= bound:
        print(f"first stretch's median ratio {_median_ratio(pairs):.3f}: a second stretch")
        pairs += _interleaved(folder / "second", predict, server, slowed, count)
    return pairs


def _within(pairs, bound=0.2):
    ratios = [p[0] / m for p, m, *_ in pairs]
    share = lambda v: None if v is None else round(v, 2)  # noqa: E731
    table = [(round(p[0], 4), round(m, 4), round(r, 3), share(p[1]), share(before), share(after))
             for (p, m, before, after), r in zip(pairs, ratios)]
    # Each pair: predicted and measured epoch (s), their ratio, and the run-queue wait per second of
    # the measurement, of the run's stretch before it and after it: a stray ratio comes with waits
    # that differ (the load changed between the two).
    print(f"predicted/measured epoch (s), ratio, CPU wait share of the prediction / the run before / after: "
          f"{table}, median ratio {float(np.median(ratios)):.3f}, load {os.getloadavg()[0]:.1f}")  # shown with pytest -s
    assert abs(float(np.median(ratios)) - 1) < bound, table


def _advise(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = advise_cli.main(list(args))
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def _predicted(metrics, server, files):
    """`disttrain advise --predict` (its own process, forked from the server: PREDICT_SERVER) for the
    run's configuration, its steps measured then (the stored timing dropped). Measured in this pytest
    process instead, the same epochs came out 20-24% slower than in a process of their own."""
    calibration = calibrate.load("cpu")
    calibration.timings = [t for t in calibration.timings if (t["model_name"], t["batch_size"]) != ("small_cnn", 128)]
    calibrate.store(calibration)
    out, err = files.with_suffix(".out"), files.with_suffix(".err")
    status = server.run(["advise", "--predict", str(metrics), "--json"], out, err)
    assert status.strip() == "0", (status, err.read_text()[-3000:] if err.exists() else "no stderr")
    (row,) = json.loads(out.read_text())["configurations"]
    assert row["source"] == "calibrated" and row["gpu"] == "cpu" and row["outside_logs"] == ""
    assert row["epoch_time_s_low"] < row["epoch_time_s"] < row["epoch_time_s_high"]
    timing = calibrate.load("cpu").timing("small_cnn", "digits", 128, 0)
    return row["epoch_time_s"], None if timing is None else timing.get("cpu_wait_share")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's PREDICT_SERVER, started before the calibration (``calibrated``): its imports
    overlap the calibration's measurements, which run on one core. That they slow it a little checks
    nothing less: no test compares the calibration's own timings with a run (each measures the
    configuration it predicts anew, from a --predict process of its own)."""
    background.wait_all()  # the machine is these tests' own from here (background.py)
    started = PredictServer(tmp_path_factory.mktemp("predict-server"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def calibrated(one_thread, server):
    calibration = _advise("--calibrate", "--device", "cpu", "--json")
    server.wait_ready()  # its imports done before any timed test
    return calibration


def test_calibrate_then_predict_a_trainer_run(calibrated, server, tmp_path):
    stored = calibrated
    assert stored["device"] == "cpu" and Path(stored["stored"]).is_file()
    assert {(t["model_name"], t["dataset"], t["batch_size"]) for t in stored["timings"]} == set(calibrate.REFERENCE)
    assert all(t["step_s"] > 0 and t["steps"] >= 3 and t["epoch_s"] > 0 for t in stored["timings"])
    assert stored["equivalent_tflops"] > 0  # placed on the logs' speed scale
    assert calibrate.load("cpu").timings == stored["timings"]  # kept, and what --predict reads
    # The issue's bound, 20%. Quiet (1 Dec 2026, load below 1), three runs' medians were 0.999, 0.987 and
    # 1.043 (single ratios 0.94-1.08). Under other jobs' load (30 Nov 2026, load 9-11) one trainer process
    # ran this CNN up to 30% slower than the next at the same wait (one run's ratios 1.00, 0.67, 0.72, 0.72,
    # 0.96, the next run's 1.39, 1.03, 1.07, 0.98, 1.07): then a second run's pairs are added (once).
    _within(_interleaved_twice(tmp_path / "runs", _predicted, server))


def test_a_run_slowed_by_a_known_amount_is_followed(calibrated, server, tmp_path, monkeypatch):
    """Every SGD step 30 ms slower, in the run and in the measurement: 12 steps an epoch, about
    0.36 s more (several times a quiet one-thread epoch). This calibration lacks the
    configuration, so each --predict measures it then."""
    stored = calibrated
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("DISTTRAIN_ADVISOR_CACHE", str(cache))
    entry = cache / Path(stored["stored"]).name  # the same device's calibration, without its steps
    entry.write_text(json.dumps({**{k: v for k, v in stored.items() if k != "stored"}, "timings": []}))
    timings = []

    def predicted(metrics, server, files):
        value = _predicted(metrics, server, files)
        timings.extend(json.loads(entry.read_text())["timings"])  # measured now, and kept
        return value

    server.setup = SLOWDOWN  # in each measuring process
    try:
        pairs = _interleaved_twice(tmp_path / "runs", predicted, server, slowed=True, count=SLOWED_PREDICTIONS)
    finally:
        server.setup = ""
    assert len(timings) == len(pairs) and all(t["step_s"] > SLOW_STEP_S for t in timings)  # sees the slower step
    _within(pairs)


def test_an_epoch_is_split_among_the_processes():
    """A rank's share of an epoch: the trainer's sampler gives each of R ranks ceil(N / R) samples."""
    timing = {"batch_size": 32, "timed_batches": 16, "epoch_s": 1.0, "step_s": 0.1, "step_s_sd": 0.0}
    assert calibrate.per_rank(1437, 2) == 719 and calibrate.per_rank(1437, 3) == 479
    assert calibrate.epoch_time({**timing, "processes": 2}, 1437)[0] == pytest.approx(1.0 + (719 // 32 - 16) * 0.1)
    assert calibrate.epoch_time(timing, 1437)[0] == pytest.approx(1.0 + (1437 // 32 - 16) * 0.1)  # one process
    # Each group of rank processes runs at a speed of its own: a wider interval than one process's.
    center, low, high = calibrate.epoch_time({**timing, "processes": 2}, 1437)
    assert high / center - 1 == pytest.approx(calibrate.DRIFT_RANKS) and calibrate.DRIFT_RANKS > calibrate.DRIFT
    cal = calibrate.Calibration(device="cpu", host="h", threads=1, timings=[{**timing, "model_name": "m",
                                "dataset": "digits", "workers": 0}])
    assert cal.timing("m", "digits", 32, 0) is not None and cal.timing("m", "digits", 32, 0, processes=2) is None
    many = __import__("pandas").DataFrame([{"model_name": "small_cnn", "batch_size": 32, "dataset": "digits",
                                            "num_of_gpus": calibrate.max_processes() + 1}])
    with pytest.raises(disttrain.advisor.AdvisorInputError, match="starts at most"):
        calibrate.predict(cal, many)  # refused before anything is started
    with pytest.raises(disttrain.advisor.AdvisorInputError, match="on 2 hosts"):
        calibrate.predict(cal, many.assign(num_of_gpus=4, num_of_nodes=2))
    with pytest.raises(disttrain.advisor.AdvisorInputError, match="one GPU"):
        calibrate.predict(calibrate.Calibration(device="NVIDIA H200", host="h", threads=1),
                          __import__("pandas").DataFrame([{"model_name": "small_cnn", "batch_size": 32,
                                                           "dataset": "digits", "num_of_gpus": 2}]))


def _two_rank_ratio(folder):
    """`--predict` on the metrics.csv of a 2-rank `disttrain train` run in ``folder``
    (harness.train_two_ranks; its timing measured anew): (predicted / measured epoch, the row, the timing)."""
    calibration = calibrate.load("cpu")
    calibration.timings = [t for t in calibration.timings if t.get("processes", 1) == 1]
    calibrate.store(calibration)
    metrics = folder / "two" / "metrics.csv"
    measured = float(np.median(_rows(metrics)[1:]))  # the first epoch warms up
    (row,) = _advise("--predict", str(metrics), "--json")["configurations"]
    timing = calibrate.load("cpu").timing("small_cnn", "digits", 32, 0, processes=2)
    print(f"2 ranks: predicted {row['epoch_time_s']:.4f} s, measured {measured:.4f} s, "
          f"wait share {None if timing is None else timing['cpu_wait_share']}")
    return row["epoch_time_s"] / measured, row, timing


def test_predict_a_two_rank_trainer_run(calibrated, two_rank_cpu_run, tmp_path):
    """The README's main job is 2 ranks: `disttrain advise --predict` on its metrics.csv measures the
    configuration with 2 processes (as `--nproc-per-node 2` starts them) and predicts a rank's
    epoch. The bound is loose (a short run and one measurement; with 2 ranks on the 2 cores any other
    load makes both wait, 0.5 of their time at load 2-3); when it is missed, two more runs are made
    and the median of the three must hold it. A prediction of the whole data set on one rank, not a
    rank's half, is about 2x and fails."""
    ratio, row, timing = _two_rank_ratio(two_rank_cpu_run)  # the session's run (conftest)
    assert row["source"] == "calibrated" and row["num_of_gpus"] == 2
    assert timing is not None and timing["processes"] == 2 and timing["epochs"] >= 2  # measured now, and kept
    ratios = [ratio]
    if not 0.6 < ratio < 1.6:
        for name in ("second", "third"):
            train_two_ranks(tmp_path / name)
            ratios.append(_two_rank_ratio(tmp_path / name)[0])
    assert 0.6 < float(np.median(ratios)) < 1.6, ratios


def test_a_failing_rank_is_one_line():
    """A configuration the ranks cannot build: the measurement's error names the rank and the reason."""
    with pytest.raises(disttrain.advisor.AdvisorInputError, match=r"on 2 processes: rank \d failed: .*no_such_model"):
        calibrate.measure_steps("no_such_model", "digits", 32, processes=2)
    with pytest.raises(disttrain.advisor.AdvisorInputError, match="one process on a GPU"):
        calibrate.measure_steps("small_cnn", "digits", 32, device="cuda", processes=2)
