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
