"""disttrain.netem: namespaces joined by the user-space wire get the delay,
the rate and the byte counts they were given, and vanish afterwards."""

import json
import os
import re
import subprocess
import sys

import pytest

from disttrain import netem

# Host 1: a TCP echo server (one connection); host 0 times round trips of 100 bytes.
ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 5001)); print("listening", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(4096): c.sendall(data)
"""
ECHO_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 5001), timeout=10); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.monotonic(); c.sendall(b"x" * 100); got = 0
    while got < 100: got += len(c.recv(4096))
    rtts.append((time.monotonic() - t) * 1e3)
print(json.dumps(sorted(rtts)))
"""
# Host 2 receives N bytes and reports how long they took from the connection on; host 0 sends them.
SINK = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 5002)); print("listening", flush=True)
c, _ = s.accept(); t = time.monotonic(); got = 0
while data := c.recv(1 << 16): got += len(data)
print(got, time.monotonic() - t, flush=True)
"""
SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5002), timeout=30); c.sendall(b"y" * int(sys.argv[2])); c.close()
"""


def _names():
    return set(re.findall(r"^(\S+)", subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout,
                          re.M))


def _serve(net, host, script):
    proc = net.popen(host, [sys.executable, "-c", script, net.hosts[host].address], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.fail("netem tests need root (network namespaces and TUN devices)")
    with netem.Network(n=3, delay_ms=50, rate_mbit=10) as network:
        yield network


def test_round_trip_is_twice_the_delay(net):
    server = _serve(net, 1, ECHO_SERVER)
    out = net.run(0, [sys.executable, "-c", ECHO_CLIENT, net.hosts[1].address], capture_output=True, text=True,
                  timeout=30)
    assert out.returncode == 0, out.stderr
    rtts = json.loads(out.stdout)
    # 2 x 50 ms plus four 152-byte serialisations at 10 Mbit/s (0.5 ms) and the scheduling of a loaded machine.
    assert 99 <= rtts[len(rtts) // 2] <= 160, rtts
    server.wait(timeout=10)


def test_rate_limit_and_byte_counters(net):
    size = 2_500_000
    before = net.stats()
    sink = _serve(net, 2, SINK)
    out = net.run(0, [sys.executable, "-c", SOURCE, net.hosts[2].address, str(size)], capture_output=True,
                  text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got, seconds = sink.communicate(timeout=30)[0].split()
    assert int(got) == size
    mbit = size * 8 / float(seconds) / 1e6
    assert 3 < mbit < 20, f"{mbit:.1f} Mbit/s through a 10 Mbit/s link"  # slow start included
    after = net.stats()
    delta = {k: [a - b for a, b in zip(after[k], before[k])] for k in after}
    # Host 0 sent the payload plus TCP/IP headers (3.6% at a 1500-byte MTU) and retransmissions (slow start
    # overflows the 100 ms queue: ~10% seen).
    assert size < delta["sent"][0] < 1.3 * size, delta
    assert size < delta["received"][2] <= delta["sent"][0], delta
    assert 0 < delta["sent"][2] < 0.1 * size, delta  # acknowledgements only
    # Delivered by destination, not to everyone: host 1 sees at most a late packet of the echo test's close.
    assert delta["sent"][1] + delta["received"][1] < 1000, delta


def test_namespaces_removed_after_exit_exception_and_crash():
    # A Network whose process died without cleaning up (a pid that no longer runs).
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netem.PREFIX}{dead.pid}x0-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with netem.Network(n=2) as net:
        names = {h.name for h in net.hosts}
        assert names <= _names() and stale not in _names()
        wire = net._wire
    assert not names & _names() and wire.poll() is not None
    with pytest.raises(ValueError, match="inside"):
        with netem.Network(n=2) as net:
            names = {h.name for h in net.hosts}
            raise ValueError("inside")
    assert not names & _names()


def test_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        with netem.Network(n=2):
            pass


@pytest.mark.parametrize("kwargs", [dict(delay_ms=float("nan")), dict(delay_ms=float("inf")),
                                    dict(rate_mbit=float("nan")), dict(rate_mbit=float("inf")),
                                    dict(queue_ms=float("nan")), dict(loss=float("nan")),
                                    dict(subnet="10.77"), dict(subnet="10.77.0.1"), dict(subnet="10.300.0"),
                                    dict(n=2.5)])
def test_bad_arguments_are_one_line_errors(kwargs):
    """A NaN delay used to pass the check and make the wire spin at full CPU (poll(0) forever, no
    packet ever due); an infinite one crashed it (OverflowError in poll); a two-octet subnet made
    every packet an 'unknown destination', dropped silently."""
    with pytest.raises(ValueError, match="netem: "):
        netem.Network(**{"n": 2, **kwargs})
