"""The exit matrix: a job whose work is done exits with status 0 on every rank,
whatever the teardown. A disttrain group and a gloo group side by side (either
one the default), on one host (2 ranks) and on two hosts (network namespaces,
2 ranks each), launched by torchrun; the script ends without
destroy_process_group(), with it, or destroying the subgroup first; with or
without an op left pending (it fails with an error naming it, within seconds,
not at the group timeout). Each case runs several times: the aborts this guards
against (a thread of a backend ended by Python mid-destructor while the
interpreter exits) are races. scripts/soak_exit.sh runs the same cases many
times.

The runs are made ahead of the tests (the module's `outcomes`), each case's in
sequence, and each test judges its own case's runs. The cases without a pending
op (no timing bound) run in two lanes at once: the one-host cases in one, the
two-host cases in the other (their own network namespaces: no address or port
shared); alone, a job leaves a core idle for a good part of its time (while its
launcher imports torch). The pending cases, whose rank 0 must exit within a
bound, then run one at a time, alone.
"""

from __future__ import annotations

import os
import re
import threading

import pytest
from torch.distributed import init_process_group

import disttrain.distributed
from exit_matrix import Case, can_make_hosts, make_hosts, remove_hosts, run_case
from harness import shared_memory_segments

# Runs per case are multiplied by this (DISTTRAIN_EXIT_REPEATS=10 for a long local check).
REPEATS = int(os.environ.get("DISTTRAIN_EXIT_REPEATS", "1"))

# Interpreter exit without destroy_process_group() is safe only if the groups
# are destroyed before Python finalizes (python/disttrain/distributed.py
# registers that at exit, once a disttrain group exists): otherwise gloo's
# worker thread may release its last op's tensors after finalization began,
# and Python ends it inside a destructor (SIGABRT). See docs/backend.md.
def _cases():
    out = []
    for topology in ("one-host", "two-hosts"):
        for default in ("disttrain", "gloo"):
            # The suite's share of the runs (46 took 5 minutes, a quarter of the suite): scripts/soak_exit.sh
            # and DISTTRAIN_EXIT_REPEATS run every case many times.
            for teardown, pending, runs in (("none", False, 2), ("none", True, 1), ("destroy", False, 1),
                                            ("destroy", True, 1), ("sub-first", False, 1)):
                if (topology, default, teardown, pending) == ("two-hosts", "disttrain", "none", False):
                    runs = 3  # the case of the report: mixed groups, two hosts, no destroy_process_group()
                marks: list = []
                case = Case(topology=topology, default=default, teardown=teardown, pending=pending)
                out.append(pytest.param(case, runs, marks=marks, id=case.label().replace(" ", ",")))
    return out


@pytest.fixture(scope="module")
def hosts():
    """Two namespace hosts for the module; the one-host cases run without them."""
    why = can_make_hosts()
    if why is None:
        make_hosts()
    yield why
    if why is None:
        remove_hosts()


LIMIT = 60.0  # the group timeout is 60 s: an exit that waits for it is a hang here


@pytest.fixture(scope="module")
def outcomes(request, hosts):
    """The runs of every case selected in this module, made before its first test: the
    cases without a pending op in two lanes (threads) at once, one-host and two-host; then
    the pending cases one after the other, nothing else running.
    -> ({case label: [Outcome per run] or the exception its runs raised}, shared-memory
    segments the runs left behind: they are made before any test's own leftover check
    (conftest) looks, so that check is made here, over all the runs)."""
    selected = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is request.module and "case" in params:
            if params["case"].topology == "one-host" or hosts is None:  # else the test fails, saying why
                selected.append((params["case"], params["runs"]))
    results: dict[str, list | BaseException] = {}

    def lane(cases):
        for case, runs in cases:
            try:
                results[case.label()] = [run_case(case, limit=LIMIT) for _ in range(runs * REPEATS)]
            except BaseException as e:  # noqa: BLE001 - the case's test raises it
                results[case.label()] = e

    before = shared_memory_segments()
    lanes = [[(c, r) for c, r in selected if not c.pending and c.topology == topology]
             for topology in ("one-host", "two-hosts")]
    threads = [threading.Thread(target=lane, args=(cases,), daemon=True) for cases in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lane([(c, r) for c, r in selected if c.pending])
    return results, sorted(shared_memory_segments() - before)


@pytest.mark.parametrize("case,runs", _cases())
def test_exit(hosts, outcomes, case, runs):
    if case.topology == "two-hosts" and hosts is not None:
        pytest.fail(f"two-host exit tests {hosts}")
    results, leftover = outcomes
    runs_made = results[case.label()]
    if isinstance(runs_made, BaseException):
        raise runs_made
    assert len(runs_made) == runs * REPEATS
    for i, o in enumerate(runs_made):
        tail = o.log[-3000:]
        assert not o.aborted, f"run {i + 1}: a rank aborted: {o.describe()}\n{tail}"
        assert not o.hung, f"run {i + 1}: hung at exit: {o.describe()}\n{tail}"
        assert o.clean, f"run {i + 1}: {o.describe()}\n{tail}"
        if case.pending and case.teardown != "none":
            rec = o.pending.get(0)
            assert rec is not None, f"run {i + 1}: rank 0 never reported its pending op: {o.describe()}"
            error = rec["error"] or ""
            # Torn down here ("shut down ... while allreduce (sequence number N) was in progress"),
            # or a peer left first ("rank 1 closed its connection while rank 0 was in ...").
            assert "DistBackendError" in error and "disttrain:" in error, error
            assert "shut down" in error or "closed its connection" in error, error
            assert rec["teardown_seconds"] < 2, rec
        if case.pending:
            # The other ranks keep the group 3 s longer: rank 0 must not wait for them.
            assert o.exit_after_teardown.get(0, 99) < 2.5, f"run {i + 1}: the pending op held the exit: {o.describe()}"
    assert not leftover, f"the exit matrix's runs left shared-memory segments behind: {leftover}"


# --- disttrain.launch: a job past its timeout, or interrupted, leaves no rank behind -------------

def _record_pid_then_hang(folder):
    import time

    import torch.distributed as dist

    from disttrain._atomic import write_atomically

    # Written whole, then renamed into place: a reader never sees a pid file still empty.
    write_atomically(os.path.join(folder, f"pid_{dist.get_rank()}"), lambda f: f.write(str(os.getpid())),
                     durable=False)
    time.sleep(600)


def _launched_pids(folder):
    pids = []
    for name in os.listdir(folder):
        if name.startswith("pid_"):  # write_atomically's temporary files begin with "."
            with open(os.path.join(folder, name)) as f:
                pids.append(int(f.read()))
    return pids


def _gone(pids, within=10.0):
    import time

    from disttrain._processes import pid_alive

    deadline = time.monotonic() + within
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def test_launch_timeout_stops_every_rank(tmp_path):
    """Was subprocess.TimeoutExpired naming torchrun's command line, with both ranks left
    running (orphans, in sessions of their own, sleeping on in a deleted folder)."""
    import disttrain

    with pytest.raises(disttrain.LaunchError, match=r"ran past timeout=12s; its ranks were stopped"):
        disttrain.launch(_record_pid_then_hang, nproc=2, args=(str(tmp_path),), timeout=12, quiet=True)
    pids = _launched_pids(tmp_path)
    assert len(pids) == 2, "the ranks never started within the timeout"
    assert not _gone(pids), "ranks outlived disttrain.launch's timeout"


def test_launch_interrupted_stops_every_rank(tmp_path):
    """Ctrl-C in a notebook (SIGINT to the kernel alone) left the ranks running."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import disttrain, sys, test_exit\n"
              "disttrain.launch(test_exit._record_pid_then_hang, nproc=2, args=(sys.argv[1],), timeout=300)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                  os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(_launched_pids(tmp_path)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        pids = _launched_pids(tmp_path)
        assert len(pids) == 2, f"the ranks never started: {proc.poll()}"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in out, out[-2000:]
    assert not _gone(pids), "ranks outlived the interrupted disttrain.launch"


def _unpicklable_result():
    import threading

    return threading.Lock()


def test_launch_unpicklable_result_and_bad_nproc():
    """A return value pickle cannot write was 'EOFError: Ran out of input' (a truncated
    result file); nproc=2.5 started torchrun, whose traceback was followed by a TypeError."""
    import disttrain

    with pytest.raises(disttrain.LaunchError, match=r"rank \d's return value \(lock\) cannot be pickled"):
        disttrain.launch(_unpicklable_result, nproc=2, timeout=300, quiet=True)
    for bad in (0, -1, 2.5, "2", True, None):
        with pytest.raises(ValueError, match="nproc must be a whole number >= 1"):
            disttrain.launch(_unpicklable_result, nproc=bad)


def _sum_then_destroy():
    import torch
    import torch.distributed as dist

    print("a line quiet=True keeps to itself")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()  # as a training script ends
    return t.item()


def test_launch_function_that_destroys_the_group_itself(capsys):
    """Was 'rank N failed: AssertionError: Process group cannot be None' on every rank, the
    results lost: the rank side destroyed the group again after fn had."""
    import disttrain

    assert disttrain.launch(_sum_then_destroy, nproc=2, timeout=300, quiet=True) == [3.0, 3.0]
    assert capsys.readouterr().out == ""  # quiet: what the ranks printed is not shown


def _print_then_wait_for(marker):
    import os
    import sys
    import time

    import torch.distributed as dist

    print("ready\r", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):  # made by the launching process once it has shown both ranks' line
        assert time.monotonic() < deadline, "the launching process did not show the line while the rank ran"
        time.sleep(0.05)
    sys.stdout.write("last words, no newline")
    return dist.get_rank()


def test_launch_shows_the_ranks_output_while_they_run(tmp_path, monkeypatch):
    """The ranks' output came back only when the job had ended: a notebook showed nothing of a
    long training until then. Each rank here waits until this process has shown its first line."""
    import io
    import sys

    import disttrain

    marker = tmp_path / "seen"

    class Watch(io.StringIO):
        def write(self, text):
            n = super().write(text)
            if all(f"[rank {r}] ready\n" in self.getvalue() for r in (0, 1)):
                marker.touch()
            return n

    shown = Watch()
    monkeypatch.setattr(sys, "stdout", shown)
    assert disttrain.launch(_print_then_wait_for, nproc=2, args=(str(marker),), timeout=120) == [0, 1]
    lines = shown.getvalue().splitlines()
    for rank in (0, 1):  # in order, the carriage return dropped, the unfinished last line shown too
        assert [line for line in lines if line.startswith(f"[rank {rank}]")] == \
            [f"[rank {rank}] ready", f"[rank {rank}] last words, no newline"], lines


def _fail_on_rank_1_while_rank_0_waits():
    import os

    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        if os.environ.get("LAUNCH_TEST_KILL"):
            os.kill(os.getpid(), 9)
        raise ValueError("rank 1's own error")
    dist.all_reduce(torch.ones(1))  # never joined: waits for the group timeout unless stopped
    return "unreachable"


def test_launch_failing_rank_stops_the_others_and_names_each_end():
    """One rank raising, or killed, while the other waits in a collective: the launch ends at
    once (not at the group timeout), the error naming what happened to each rank."""
    import time

    import disttrain

    for kill, first in ((False, r"rank 1 failed:\n.*ValueError: rank 1's own error"),
                        (True, r"rank 1 produced no result: it was killed by SIGKILL before returning")):
        start = time.monotonic()
        with pytest.raises(disttrain.LaunchError) as info:
            disttrain.launch(_fail_on_rank_1_while_rank_0_waits, nproc=2, timeout=120, quiet=True,
                             env={"LAUNCH_TEST_KILL": "1"} if kill else None)
        message = str(info.value)
        assert time.monotonic() - start < 60, "the launch waited for the stuck rank"
        assert re.search(first, message, re.S), message
        # Rank 0 either saw its peer go (the backend's error) or was stopped here.
        assert re.search(r"rank 0 (failed:\n.*DistBackendError|produced no result: it was killed by SIGTERM "
                         r"before returning \(stopped after another rank failed\))", message, re.S), message


def _init_as_a_torchrun_script_does():
    import torch
    import torch.distributed as dist

    seen = []
    # As scripts written for torchrun or mp.spawn begin: this module's `from torch.distributed import
    # init_process_group`, then the module's attribute; each group destroyed and made again.
    for init in (lambda: init_process_group(backend="disttrain", init_method="env://"),
                 lambda: dist.init_process_group("gloo"), lambda: dist.init_process_group("disttrain")):
        init()
        t = torch.ones(1) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        seen.append((dist.get_backend(), t.item()))
        dist.destroy_process_group()
    return seen


def test_launch_runs_a_function_that_makes_its_own_group():
    """A function written for torchrun calls init_process_group itself: it raised 'trying to
    initialize the default process group twice!'. Its call now replaces the group launch made
    (a disttrain group made again on the same store: the new one read the old one's keys,
    'cannot open rank 0's segment'); then gloo, then disttrain once more."""
    import disttrain

    expected = [("disttrain", 3.0), ("gloo", 3.0), ("disttrain", 3.0)]
    assert disttrain.launch(_init_as_a_torchrun_script_does, nproc=2, timeout=120, quiet=True) == [expected] * 2


def _launch_environment():
    import os

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS", "LAUNCH_TEST_EXTRA")
    return {name: os.environ.get(name) for name in names}


def test_launch_gives_each_rank_torchruns_environment_and_leaves_the_callers(monkeypatch):
    """What scripts and libraries read to see they run under torchrun (Lightning looks for
    TORCHELASTIC_RUN_ID): the same names, one job id, nothing left in this process; three
    ranks, an odd size."""
    import disttrain

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    envs = disttrain.launch(_launch_environment, nproc=3, timeout=120, quiet=True, env={"LAUNCH_TEST_EXTRA": "x"})
    assert dict(os.environ) == before
    assert [(e["RANK"], e["LOCAL_RANK"], e["ROLE_RANK"]) for e in envs] == [(str(r),) * 3 for r in range(3)]
    for e in envs:
        assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"], e["MASTER_ADDR"]) == ("3", "3", "0", "127.0.0.1")
        assert (e["TORCHELASTIC_RESTART_COUNT"], e["OMP_NUM_THREADS"], e["LAUNCH_TEST_EXTRA"]) == ("0", "1", "x")
    assert len({e["TORCHELASTIC_RUN_ID"] for e in envs}) == 1 and envs[0]["TORCHELASTIC_RUN_ID"]


def test_bench_launch_times_each_method_and_checks_its_results(tmp_path, capsys):
    """`disttrain bench launch` at one rank (the cheapest job): a row per method, torchrun's the
    reference; each job's results are checked by the benchmark (a wrong sum raises)."""
    import csv

    from disttrain.bench import launch as bench_launch

    out = tmp_path / "launch.csv"
    assert bench_launch.main(["launch", "--nproc", "1", "--repeats", "1", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["disttrain.launch", "torchrun", "mp.spawn"]
    for r in rows:
        assert r["nproc"] == "1" and float(r["median_s"]) > 0
        assert float(r["time_vs_torchrun"]) == pytest.approx(float(r["median_s"]) / float(rows[1]["median_s"]), rel=0.01)
    for bad in (["--nproc", "0"], ["--nproc", "2,x"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            bench_launch.main(["launch", *bad, "--out", str(out)])
        assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
