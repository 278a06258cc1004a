"""An emulated slow network on one machine: N network namespaces joined by a
user-space wire with a one-way delay, a rate limit per link and optional loss.

The kernel's ``tc netem`` is not available everywhere (no ``sch_netem`` module
in many containers), so the wire is a process of its own: each namespace gets
a TUN device (``wire0``, address ``10.77.0.<i+1>/24``) whose file descriptor
the wire holds; the wire reads IP packets from every TUN, and delivers each to
the TUN of the namespace that owns its destination address. A packet from host
A to host B is serialised on A's link at the rate, travels ``delay_ms``, then is
serialised on B's link (a store-and-forward switch with full-duplex links of
``rate_mbit`` each); a link's queue holds at most ``queue_ms`` of traffic at its
rate (drop-tail beyond). The wire counts the IPv4 bytes (headers included) each
host sends and receives, so every system measured on one network is counted
the same way.

Example::

    with netem.Network(n=4, delay_ms=50, rate_mbit=10) as net:
        server = net.popen(1, ["python3", "-m", "http.server", "--bind", net.hosts[1].address])
        net.run(0, ["curl", f"http://{net.hosts[1].address}:8000/"])
        print(net.bytes_sent(0), net.bytes_received(0))

Requires root (network namespaces, TUN devices) and iproute2. The wire runs as
this file's ``__main__`` (in a process of its own); it exits when the controlling process closes
its stdin (or dies), and its TUN devices disappear with it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import fcntl
import heapq
import itertools
import json
import math
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

PREFIX = "dtnem"  # namespace names: dtnem<pid>x<k>-<i> (the tests' own namespaces are dt-*)
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)x\d+-\d+$")
DEVICE = "wire0"
_counter = itertools.count()

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


@dataclasses.dataclass(frozen=True)
class Host:
    """One emulated host: its namespace ``name``, IPv4 ``address`` and ``index``."""
    index: int
    name: str
    address: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _kill_namespace(name: str) -> None:
    """SIGKILLs every process in namespace ``name`` and deletes it."""
    for pid in _ip("netns", "pids", name).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name)


def remove_stale_namespaces() -> list[str]:
    """Deletes the namespaces of Networks whose owning process is gone
    (a test killed before its ``__exit__``). Returns their names."""
    from disttrain._processes import pid_alive  # not at the top: the wire runs this file without the package

    stale = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            _kill_namespace(name)
            stale.append(name)
    return stale


class Network:
    """``n`` hosts in network namespaces joined by an emulated wire.

    Args:
        n: number of hosts (namespaces), at least 1.
        delay_ms: one-way delay between any two hosts, in milliseconds.
        rate_mbit: each host's link rate in Mbit/s, each direction (None: unlimited).
        loss: probability that a packet is dropped, in [0, 1).
        queue_ms: a link's queue holds this many milliseconds of traffic at its
            rate; packets beyond are dropped (ignored without a rate).
        subnet: the first three octets of the hosts' /24; host i is ``subnet.(i+1)``.
        seed: seed of the loss draws.

    Example::

        with Network(n=2, delay_ms=50, rate_mbit=10) as net:
            net.run(0, ["ping", "-c", "1", net.hosts[1].address])
    """

    def __init__(self, n: int, delay_ms: float = 0.0, rate_mbit: float | None = None, loss: float = 0.0,
                 queue_ms: float = 100.0, subnet: str = "10.77.0", seed: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > 250:
            raise ValueError(f"netem: n={n} hosts; expected a whole number from 1 to 250")
        # Finite numbers only: a NaN delay made the wire spin (no packet ever due), an infinite one crashed it.
        if not (math.isfinite(delay_ms) and delay_ms >= 0) or not 0 <= loss < 1 \
                or not (math.isfinite(queue_ms) and queue_ms > 0) \
                or (rate_mbit is not None and not (math.isfinite(rate_mbit) and rate_mbit > 0)):
            raise ValueError(f"netem: delay_ms={delay_ms}, rate_mbit={rate_mbit}, loss={loss}, queue_ms={queue_ms}; "
                             "expected finite delay_ms >= 0, rate_mbit > 0 or None, 0 <= loss < 1, queue_ms > 0")
        octets = subnet.split(".")
        if len(octets) != 3 or not all(o.isdigit() and int(o) < 256 for o in octets):
            raise ValueError(f"netem: subnet={subnet!r}; expected the first three octets of an IPv4 /24, "
                             "like '10.77.0'")
        self.n, self.delay_ms, self.rate_mbit, self.loss, self.queue_ms, self.seed = \
            n, delay_ms, rate_mbit, loss, queue_ms, seed
        tag = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self.hosts = [Host(i, f"{tag}-{i}", f"{subnet}.{i + 1}") for i in range(n)]
        self._wire: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    # --- set-up and tear-down -------------------------------------------------------------------

    def __enter__(self) -> Network:
        if os.geteuid() != 0:
            raise PermissionError("netem: an emulated network needs root (network namespaces and TUN devices); "
                                  "run as root or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN")
        if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
            raise RuntimeError("netem: needs iproute2 ('ip') and /dev/net/tun (apt-get install iproute2; "
                               "in a container, pass --device /dev/net/tun)")
        remove_stale_namespaces()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        for host in self.hosts:
            self._check(_ip("netns", "add", host.name), f"netns add {host.name}")
        # The wire runs this file isolated (-I): stdlib only, no torch import, nothing of the caller's path.
        cmd = [sys.executable, "-I", "-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')", os.path.abspath(__file__), "--namespaces", ",".join(h.name for h in self.hosts),
               "--addresses", ",".join(h.address for h in self.hosts), "--delay-ms", str(self.delay_ms),
               "--loss", str(self.loss), "--queue-ms", str(self.queue_ms), "--seed", str(self.seed)]
        if self.rate_mbit is not None:
            cmd += ["--rate-mbit", str(self.rate_mbit)]
        self._wire = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._wire.stdout is not None
        ready = self._wire.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"netem: the wire process did not start (said {ready!r}; exit {self._wire.poll()})")
        for host in self.hosts:
            for step in (("addr", "add", f"{host.address}/24", "dev", DEVICE), ("link", "set", DEVICE, "up"),
                         ("link", "set", "lo", "up")):
                self._check(_ip("-n", host.name, *step), f"-n {host.name} {' '.join(step)}")

    @staticmethod
    def _check(res: subprocess.CompletedProcess, what: str) -> None:
        if res.returncode != 0:
            raise RuntimeError(f"netem: 'ip {what}' failed: {res.stderr.strip()}")

    def close(self) -> None:
        """Kills every process in the namespaces, stops the wire and deletes the
        namespaces (``__exit__`` calls it; safe to call twice)."""
        for host in self.hosts:
            _kill_namespace(host.name)
        for proc in self._procs:
            try:
                proc.kill()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._procs = []
        if self._wire is not None:
            try:
                if self._wire.stdin is not None:
                    self._wire.stdin.close()
                self._wire.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._wire.kill()
                self._wire.wait()
            self._wire = None

    # --- processes in a host --------------------------------------------------------------------

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs in host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[i].name, *argv]

    def run(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, **kwargs)`` in host ``i``'s namespace."""
        return subprocess.run(self.command(i, argv), **kwargs)

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen(argv, **kwargs)`` in host ``i``'s namespace; killed by ``close()``
        if still running."""
        proc = subprocess.Popen(self.command(i, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def kill_host(self, i: int) -> None:
        """SIGKILLs every process in host ``i``'s namespace (a machine that dies)."""
        for pid in _ip("netns", "pids", self.hosts[i].name).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- the wire's counters --------------------------------------------------------------------

    def stats(self) -> dict[str, list[int]]:
        """The wire's counters since it started, one entry per host: ``sent`` and
        ``received`` (IPv4 bytes, headers included), ``sent_packets``,
        ``received_packets`` and ``dropped`` (packets from that host lost to the
        loss draw, a full queue or an unknown destination)."""
        if self._wire is None or self._wire.stdin is None or self._wire.stdout is None:
            raise RuntimeError("netem: the network is not running (use it inside 'with Network(...)')")
        with self._lock:
            self._wire.stdin.write("stats\n")
            self._wire.stdin.flush()
            line = self._wire.stdout.readline()
        if not line:
            raise RuntimeError(f"netem: the wire process exited (status {self._wire.poll()})")
        return json.loads(line)

    def bytes_sent(self, i: int) -> int:
        """IPv4 bytes host ``i`` has sent onto the wire."""
        return self.stats()["sent"][i]

    def bytes_received(self, i: int) -> int:
        """IPv4 bytes the wire has delivered to host ``i``."""
        return self.stats()["received"][i]


# --- the wire process -------------------------------------------------------------------------------

def _open_tun_in(namespace: str, libc: Any) -> int:
    """Creates TUN device DEVICE inside ``namespace`` and returns its fd. The
    calling thread enters the namespace only to create it (a TUN device lives
    in the namespace of the process that creates it; its fd works from anywhere)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", DEVICE.encode(), _IFF_TUN | _IFF_NO_PI))
            try:  # no IPv6 chatter (router solicitations) on the wire
                with open(f"/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6", "w") as f:
                    f.write("1")
            except OSError:
                pass
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the wire's own namespace")
    finally:
        os.close(own)
        os.close(target)
    return fd


def _wire_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netem.py",
                                     description="the wire of disttrain.netem.Network (started by it)")
    parser.add_argument("--namespaces", required=True)
    parser.add_argument("--addresses", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--rate-mbit", type=float, default=None)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--queue-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controlling process decides when the wire stops
    namespaces = args.namespaces.split(",")
    addresses = [bytes(int(o) for o in a.split(".")) for a in args.addresses.split(",")]
    libc = ctypes.CDLL(None, use_errno=True)
    tuns = [_open_tun_in(ns, libc) for ns in namespaces]
    wire = _Wire(tuns, addresses, args.delay_ms / 1e3,
                 None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8, args.loss, args.queue_ms / 1e3,
                 random.Random(args.seed))
    os.write(1, b"ready\n")
    wire.loop()
    return 0


class _Wire:
    """The forwarding loop: epoll on the TUN fds and stdin (commands), a heap
    of timed events. Stage 1 of a packet is its arrival at the switch (after
    its sender's link and the delay), stage 2 its delivery (after the
    receiver's link)."""

    def __init__(self, tuns: list[int], addresses: list[bytes], delay_s: float, rate_bytes: float | None,
                 loss: float, queue_s: float, rng: random.Random) -> None:
        self.tuns, self.delay_s, self.rate_bytes, self.loss, self.queue_s, self.rng = \
            tuns, delay_s, rate_bytes, loss, queue_s, rng
        self.host_of_fd = {fd: i for i, fd in enumerate(tuns)}
        self.host_of_addr = {a: i for i, a in enumerate(addresses)}
        n = len(tuns)
        self.up_free = [0.0] * n    # when each host's link to the switch is next idle
        self.down_free = [0.0] * n  # when the switch's link to each host is next idle
        self.counters: dict[str, list[int]] = {k: [0] * n for k in
                                               ("sent", "received", "sent_packets", "received_packets", "dropped")}
        self.heap: list[tuple[float, int, int, int, int, bytes]] = []
        self.seq = itertools.count()

    def _link(self, free: list[float], i: int, now: float, size: int) -> float | None:
        """Queues ``size`` bytes on link ``free[i]`` at ``now``: returns when the
        last bit leaves, or None when the queue is full."""
        if self.rate_bytes is None:
            return now
        start = max(now, free[i])
        if start - now > self.queue_s:
            return None
        free[i] = start + size / self.rate_bytes
        return free[i]

    def _receive(self, src: int, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # not IPv4: not forwarded, not counted
        self.counters["sent"][src] += len(packet)
        self.counters["sent_packets"][src] += 1
        dst = self.host_of_addr.get(packet[16:20])
        if dst is None or (self.loss and self.rng.random() < self.loss):
            self.counters["dropped"][src] += 1
            return
        leaves = self._link(self.up_free, src, now, len(packet))
        if leaves is None:
            self.counters["dropped"][src] += 1
            return
        heapq.heappush(self.heap, (leaves + self.delay_s, next(self.seq), 1, src, dst, packet))

    def _event(self, when: float, stage: int, src: int, dst: int, packet: bytes) -> None:
        if stage == 1:
            delivered = self._link(self.down_free, dst, when, len(packet))
            if delivered is None:
                self.counters["dropped"][src] += 1
            else:
                heapq.heappush(self.heap, (delivered, next(self.seq), 2, src, dst, packet))
            return
        try:
            os.write(self.tuns[dst], packet)
        except OSError:  # the host's device is down or gone: the packet is lost
            self.counters["dropped"][src] += 1
            return
        self.counters["received"][dst] += len(packet)
        self.counters["received_packets"][dst] += 1

    def _command(self, pending: bytes) -> bytes:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip() == b"stats":
                os.write(1, (json.dumps(self.counters) + "\n").encode())
        return pending

    def loop(self) -> None:
        poller = select.epoll()
        for fd in self.tuns:
            poller.register(fd, select.EPOLLIN)
        poller.register(0, select.EPOLLIN)
        pending = b""
        while True:
            timeout = max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else -1
            for fd, _ in poller.poll(timeout):
                if fd == 0:
                    data = os.read(0, 4096)
                    if not data:
                        return  # the controlling process closed our stdin or died
                    pending = self._command(pending + data)
                    continue
                src, now = self.host_of_fd[fd], time.monotonic()
                for _ in range(64):  # bounded, so one busy host cannot starve the others
                    try:
                        packet = os.read(fd, 65536)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                            break
                        raise
                    self._receive(src, packet, now)
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                when, _, stage, src, dst, packet = heapq.heappop(self.heap)
                self._event(when, stage, src, dst, packet)


if __name__ == "__main__":
    sys.exit(_wire_main(sys.argv[1:]))
