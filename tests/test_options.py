"""Backend settings: parsed once per group from the environment and pg_options
(csrc/comm/options.cpp), rejected when unknown or malformed, printed by
`disttrain info`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import disttrain
from disttrain import _C
from harness import RankFailure, run_ranks


def _effective(**env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return {name: (value, source) for name, value, source, _ in _C.comm_options()}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_defaults_environment_and_overrides_in_rising_priority():
    base = _effective()
    assert base["chunk_bytes"] == ("1048576", "default")
    assert base["shm_slot_bytes"] == ("1048576", "default")
    env = _effective(DISTTRAIN_CHUNK_BYTES="8192", DISTTRAIN_ALLREDUCE_ALGO="rd")
    assert env["chunk_bytes"] == ("8192", "environment DISTTRAIN_CHUNK_BYTES")
    assert env["allreduce_algorithm"] == ("rd", "environment DISTTRAIN_ALLREDUCE_ALGO")
    os.environ["DISTTRAIN_CHUNK_BYTES"] = "8192"
    try:
        both = {n: (v, s) for n, v, s, _ in _C.comm_options({"chunk_bytes": "65536"})}
    finally:
        del os.environ["DISTTRAIN_CHUNK_BYTES"]
    assert both["chunk_bytes"] == ("65536", "options")
    # Rounded as documented: chunks to 64 bytes, slots to pages.
    rounded = {n: v for n, v, _, _ in _C.comm_options({"chunk_bytes": "5000", "shm_slot_bytes": "10000"})}
    assert rounded["chunk_bytes"] == "4992" and rounded["shm_slot_bytes"] == "8192"


@pytest.mark.parametrize("name, value, message", [
    ("transport", "udp", "not one of auto, tcp, shm"),
    ("allreduce_algorithm", "tree", "not one of auto, ring, rd"),
    ("chunk_bytes", "1MB", "not a whole number"),
    ("chunk_bytes", "100", r"\[4096, 1048576\]"),
    ("chunk_bytes", "-4096", "not a whole number"),
    ("socket_buffer_bytes", "99999999999", "not a whole number"),
    ("shm_slot_bytes", "", "not a whole number"),
    ("restart_attempt", "x", "not a whole number"),
    ("shm_wait", "spin", "not one of auto, yield, sleep"),
    ("chunk_size", "4096", "unknown backend option 'chunk_size'"),
])
def test_unknown_or_malformed_options_are_rejected(name, value, message):
    with pytest.raises(ValueError, match=message):
        _C.comm_options({name: value})
    if name != "chunk_size" and value != "":
        with pytest.raises(ValueError, match=message):
            disttrain.BackendOptions(**{name: value})


def test_backend_options_type_errors():
    with pytest.raises(TypeError, match="string or an integer"):
        disttrain.BackendOptions(chunk_bytes=4096.0)
    assert disttrain.BackendOptions(chunk_bytes=8192).settings == {"chunk_bytes": "8192"}


def _group_options(rank, world):
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    sub = dist.new_group([0, 1], backend="disttrain", pg_options={"transport": "tcp", "chunk_bytes": 4096})
    sub_backend = sub._get_backend(torch.device("cpu"))
    t = torch.arange(100_000, dtype=torch.float32)
    dist.all_reduce(t, group=sub)
    ok = torch.equal(t, torch.arange(100_000, dtype=torch.float32) * 2)
    return backend.transport, dict((n, v) for n, v, _, _ in backend.options)["chunk_bytes"], \
        sub_backend.transport, dict((n, v) for n, v, _, _ in sub_backend.options)["chunk_bytes"], ok


def test_pg_options_override_the_environment_per_group():
    results = run_ranks(_group_options, 2, env={"DISTTRAIN_CHUNK_BYTES": "65536", "DISTTRAIN_TRANSPORT": "auto"})
    for world_transport, world_chunk, sub_transport, sub_chunk, ok in results:
        assert (world_transport, world_chunk) == ("shm", "65536")
        assert (sub_transport, sub_chunk) == ("tcp", "4096")
        assert ok


def _nothing(rank, world):
    return rank


def _sums_with_every_wait(rank, world):
    """All-reduces (below, at and above one slot, several epochs) over groups whose shared-memory
    waits sleep at once, yield first, or choose: every way of waiting moves the same data."""
    out = {}
    for wait in ("sleep", "yield", "auto"):
        group = dist.new_group(backend="disttrain", pg_options={"shm_wait": wait, "shm_slot_bytes": "8192"})
        for count in (1, 1000, 2048, 2049, 50_000):
            t = torch.arange(count, dtype=torch.float64) + rank
            dist.all_reduce(t, group=group)
            out[(wait, count)] = torch.equal(t, world * torch.arange(count, dtype=torch.float64)
                                             + world * (world - 1) / 2)
        dist.barrier(group=group)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_every_shm_wait_moves_the_same_data(world):
    for result in run_ranks(_sums_with_every_wait, world, timeout=180):
        assert all(result.values()), result


@pytest.mark.parametrize("env, message", [
    ({"DISTTRAIN_CHUNK_BYTES": "lots"}, "chunk_bytes='lots' is not a whole number"),
    ({"DISTTRAIN_ALLREDUCE_ALGO": "tree", "DISTTRAIN_TRANSPORT": "tcp"}, "allreduce_algorithm='tree' is not one of"),
])
def test_malformed_environment_fails_group_creation_on_every_rank(env, message):
    with pytest.raises(RankFailure, match=message):
        run_ranks(_nothing, 2, env=env, timeout=60)


def test_info_prints_the_effective_options():
    env = dict(os.environ, DISTTRAIN_ALLREDUCE_ALGO="ring", DISTTRAIN_SOCKET_BUFFER="262144")
    out = subprocess.run([sys.executable, "-m", "disttrain.cli", "info"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "allreduce_algorithm  ring" in out.stdout
    assert "environment DISTTRAIN_ALLREDUCE_ALGO" in out.stdout
    assert "socket_buffer_bytes  262144" in out.stdout
    # The wait's default depends on the group's ranks per core: both choices are shown.
    cores = len(os.sched_getaffinity(0))
    assert f"shm_wait             auto             default (yield, or sleep when a host runs more than {cores} ranks" \
        in out.stdout, out.stdout
    assert "NCCL path     not built: torch is a CPU build" in out.stdout or torch.cuda.is_available()
    js = subprocess.run([sys.executable, "-m", "disttrain.cli", "info", "--json"], env=env, capture_output=True,
                        text=True, timeout=120)
    options = {o["name"]: o["value"] for o in json.loads(js.stdout)["options"]}
    assert options["allreduce_algorithm"] == "ring" and options["transport"] == "auto"


def test_info_rejects_a_malformed_setting_in_one_line():
    env = dict(os.environ, DISTTRAIN_TRANSPORT="infiniband")
    out = subprocess.run([sys.executable, "-m", "disttrain.cli", "info"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "transport='infiniband' is not one of auto, tcp, shm" in out.stderr
    assert "Traceback" not in out.stderr


def _settings_differ(rank, world, name, values):
    """A group whose ranks were given different values of a setting they must share:
    every rank raises the same ValueError naming the setting, within the timeout."""
    import datetime
    import time
    start = time.monotonic()
    try:
        group = dist.new_group(backend="disttrain", pg_options={name: values[rank % len(values)]},
                               timeout=datetime.timedelta(seconds=20))
        dist.all_reduce(torch.ones(4), group=group)
        message = None
    except Exception as e:  # noqa: BLE001 - the test reads the message
        message = f"{type(e).__name__}: {e}"
    return message, time.monotonic() - start


@pytest.mark.parametrize("name,values", [("transport", ["tcp", "shm"]), ("shm_slot_bytes", ["4096", "1048576"]),
                                         ("allreduce_algorithm", ["ring", "rd"])])
def test_settings_the_ranks_must_share_are_compared_at_group_creation(name, values):
    transport = "tcp" if name == "allreduce_algorithm" else "auto"  # where the setting matters
    results = run_ranks(_settings_differ, 3, (name, values), env={"DISTTRAIN_TRANSPORT": transport}, timeout=120)
    want = f"rank 0 has {name}={values[0]}, rank 1 has {name}={values[1]}"
    for message, seconds in results:
        assert message is not None and "ValueError" in message and want in message, message
        assert seconds < 10, seconds


# --- disttrain bench: option values checked before a benchmark starts a rank ---------------------

@pytest.mark.parametrize("argv,expected", [
    # a world size no machine here can hold: torchrun would start 10 million processes
    (["allreduce", "--nproc", "10000000"], "--nproc 10000000: more ranks than this machine can hold"),
    (["ddp", "--ranks", "2,10000000"], "--ranks 10000000: more ranks than this machine can hold"),
    (["strategies", "--processes", "10000000"], "--processes 10000000: more ranks"),
    (["mpi", "--eval-ranks", "10000000"], "--eval-ranks 10000000: more ranks"),
    # outputs where nothing can be written (root passes access() on /proc: only a real file tells)
    (["allreduce", "--out", "/proc/disttrain.csv"], "--out '/proc/disttrain.csv': '/proc' is not a writable folder"),
    (["snapshot", "--peers-csv", "/proc/p.csv"], "--peers-csv '/proc/p.csv': '/proc' is not a writable folder"),
    (["snapshot", "--kill-csv", "/proc/k.csv"], "--kill-csv '/proc/k.csv'"),
    (["ddp", "--trace", "/proc/disttrain-trace"], "--trace '/proc/disttrain-trace'"),
    (["ddp", "--trace", os.path.abspath(__file__)], "is a file; expected a folder"),
    (["fault", "--keep", "/proc/disttrain-keep"], "--keep '/proc/disttrain-keep'"),
    # fractions that were silently meaningless (resume after 25 of 5 batches, a kill that never comes)
    (["resume", "--resume-at", "5"], "--resume-at 5: expected a fraction in (0, 1]"),
    (["snapshot", "--kill-at", "0.5", "2"], "--kill-at 2: expected a fraction in (0, 1]"),
    # values each benchmark checked only later, inside its ranks, or not at all
    (["ddp", "--peers", "torch-best", "--best-bucket-mb", "-1"], "--best-bucket-mb '-1': expected bucket sizes"),
    (["ddp", "--best-bucket-mb", "nan"], "--best-bucket-mb 'nan'"),
    (["ddp", "--best-backends", "nccl2"], "--best-backends 'nccl2': unknown 'nccl2'"),
    (["mpi", "--transfer", "carrier-pigeon"], "--transfer 'carrier-pigeon': give broadcast, sendrecv or both"),
    (["fault", "--steps", "10", "--kill-at", "500"], "--kill-at 500: must be at least 2 below --steps 10"),
    (["decentralised", "--delay-ms", "-1"], "--delay-ms -1: expected a number >= 0"),  # 0 is valid: no delay
])
def test_bench_bad_values_are_one_line_and_exit_2(monkeypatch, capsys, argv, expected):
    import disttrain.bench
    from disttrain import cli

    def started(argv):  # a value the check lets through must not start the benchmark here
        raise AssertionError(f"the benchmark started: {argv}")

    monkeypatch.setattr(disttrain.bench, "main", started)
    assert cli.main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(f"disttrain bench {argv[0]}: error: ") and expected in lines[0], lines[0]


def test_bench_good_values_pass(tmp_path):
    from disttrain import cli

    for argv in (["allreduce", "--nproc", "3", "--out", str(tmp_path / "new" / "a.csv")],
                 ["ddp", "--trace", str(tmp_path / "trace"), "--best-bucket-mb", "0.5,25", "--best-backends", "gloo"],
                 ["resume", "--resume-at", "1"], ["snapshot", "--kill-at", "0.1", "1"],
                 ["mpi", "--transfer", "broadcast"], ["fault", "--steps", "10", "--kill-at", "7"],
                 ["decentralised", "--delay-ms", "0"], ["snapshot", "--min-free-gb", "0"]):
        assert cli._check_bench(argv) is None, argv
    assert not (tmp_path / "new").exists() and not (tmp_path / "trace").exists()  # the checks make nothing


def test_bench_without_a_name_is_an_error_on_stderr(capsys):
    from disttrain import cli

    assert cli.main(["bench"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: disttrain bench {allreduce,")
    assert cli.main(["bench", "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("usage: disttrain bench {allreduce,")
