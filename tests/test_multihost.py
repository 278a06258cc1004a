"""Two hosts on one machine: two network namespaces joined by a veth pair,
two ranks in each, launched with torchrun --nnodes=2. Results equal gloo's;
a host killed mid-job makes the other host's ranks raise within the timeout."""

import json
import os
import subprocess
import sys
import time

import pytest

from disttrain.netns import NamespaceHosts, can_make_hosts

HOSTS = NamespaceHosts(namespaces=("dt-host0", "dt-host1"), veths=("dt-veth0", "dt-veth1"),
                       addresses=("10.231.77.1", "10.231.77.2"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


@pytest.fixture(scope="module")
def two_hosts():
    why = can_make_hosts()
    if why:
        pytest.fail(f"multi-host tests {why}")
    with HOSTS:
        yield


def _launch(node, out_dir, mode):
    cmd = HOSTS.command(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=2", f"--master-addr={HOSTS.addresses[0]}", "--master-port=29555",
                               WORKER, out_dir, mode])
    env = dict(os.environ, OMP_NUM_THREADS="1", **HOSTS.env(node))  # gloo (the reference) needs its interface
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_host(node):
    HOSTS.kill(node)  # a host that vanishes: its launcher and its ranks


def _results(out_dir):
    out = {}
    for rank in range(4):
        path = os.path.join(out_dir, f"rank_{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[rank] = json.load(f)
    return out


def test_two_hosts_match_gloo(two_hosts, tmp_path):
    procs = [_launch(node, str(tmp_path), "check") for node in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    results = _results(str(tmp_path))
    assert sorted(results) == [0, 1, 2, 3], "\n".join(logs)
    for rank, res in results.items():
        assert res.get("error") is None, res
        assert res["mismatches"] == [], (rank, res["mismatches"])
        assert res["transport"] == "shm+tcp"  # shared memory within a host, TCP between hosts


def test_killed_host_makes_the_other_host_raise(two_hosts, tmp_path):
    procs = [_launch(node, str(tmp_path), "kill") for node in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(os.path.exists(tmp_path / f"ready_{r}") for r in range(4)):
        assert time.monotonic() < deadline, "ranks never got ready"
        assert all(p.poll() is None for p in procs), procs[0].stdout.read() if procs[0].poll() is not None else ""
        time.sleep(0.2)
    time.sleep(0.5)
    _kill_host(1)  # host 1 vanishes: launcher and both ranks
    procs[1].wait()
    # Host 0's ranks report; its launcher would then wait for the dead host's
    # launcher at its exit barrier, so it is stopped once the ranks have spoken.
    deadline = time.monotonic() + 60
    while len(_results(str(tmp_path))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_host(0)
    log = procs[0].communicate(timeout=30)[0]
    results = _results(str(tmp_path))
    for rank in (0, 1):
        assert rank in results, log
        res = results[rank]
        assert res["error"], res
        assert "rank 2" in res["error"] or "rank 3" in res["error"], res["error"]
        assert res["op_seconds"] < 20 + 5
