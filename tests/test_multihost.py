"""Two hosts on one machine: two network namespaces joined by a veth pair,
two ranks in each, launched with torchrun --nnodes=2. Results equal gloo's;
a host killed mid-job makes the other host's ranks raise within the timeout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

NAMESPACES = ("dt-host0", "dt-host1")
ADDRESSES = ("10.231.77.1", "10.231.77.2")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _teardown():
    for ns in NAMESPACES:
        _ip("netns", "del", ns)


@pytest.fixture(scope="module")
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("multi-host tests need root and iproute2 (scripts/setup.sh installs iproute2)")
    _teardown()
    steps = [("netns", "add", NAMESPACES[0]), ("netns", "add", NAMESPACES[1]),
             ("link", "add", "dt-veth0", "type", "veth", "peer", "name", "dt-veth1"),
             ("link", "set", "dt-veth0", "netns", NAMESPACES[0]), ("link", "set", "dt-veth1", "netns", NAMESPACES[1])]
    for i, ns in enumerate(NAMESPACES):
        steps += [("-n", ns, "addr", "add", f"{ADDRESSES[i]}/24", "dev", f"dt-veth{i}"),
                  ("-n", ns, "link", "set", f"dt-veth{i}", "up"), ("-n", ns, "link", "set", "lo", "up")]
    for step in steps:
        res = _ip(*step)
        assert res.returncode == 0, f"ip {' '.join(step)}: {res.stderr}"
    yield
    _teardown()


def _launch(node, out_dir, mode):
    cmd = ["ip", "netns", "exec", NAMESPACES[node], sys.executable, "-m", "torch.distributed.run",
           "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2", f"--master-addr={ADDRESSES[0]}",
           "--master-port=29555", WORKER, out_dir, mode]
    # gloo (the reference) picks its interface from the host name otherwise.
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=f"dt-veth{node}")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_host(node):
    """SIGKILL every process in the host's namespace (torchrun starts its
    workers in sessions of their own, so a process group is not enough)."""
    pids = _ip("netns", "pids", NAMESPACES[node]).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


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
