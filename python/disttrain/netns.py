"""Two "hosts" on one machine: two network namespaces joined by a veth pair.

Each namespace has its own network stack (its own loopback, one interface
with its own address), so ranks started inside them (``ip netns exec NS ...``)
talk to the other host over TCP exactly as across machines, and disttrain's
backend sees two hosts (shared memory within each, TCP between them). Used by
``disttrain bench scaling`` (its 2 x 2 configuration) and by the multi-host
tests. Needs root and iproute2.

    hosts = NamespaceHosts("dtscale")     # dtscale-h0/-h1, 10.231.80.1/.2
    hosts.make()
    subprocess.run(hosts.command(0, ["python3", "-c", "..."]), env={**os.environ, **hosts.env(0)})
    hosts.remove()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

__all__ = ["NamespaceHosts", "can_make_hosts"]


def can_make_hosts() -> str | None:
    """None if network-namespace hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (scripts/setup.sh installs it)"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class NamespaceHosts:
    """Two network namespaces joined by one veth pair, each with one address of a /24.

    Args:
        prefix: names: namespaces ``PREFIX-h0``/``PREFIX-h1``, interfaces
            ``PREFIX-veth0``/``PREFIX-veth1`` (an interface name has at most 15 characters).
        subnet: the third byte of the addresses ``10.231.SUBNET.1`` and ``.2``;
            two sets of hosts alive at once need different prefixes and subnets.
        namespaces, veths, addresses: explicit names instead (two each).
    """

    def __init__(self, prefix: str = "dt", subnet: int = 77, *, namespaces: Sequence[str] | None = None,
                 veths: Sequence[str] | None = None, addresses: Sequence[str] | None = None):
        self.namespaces = tuple(namespaces or (f"{prefix}-h0", f"{prefix}-h1"))
        self.veths = tuple(veths or (f"{prefix}-veth0", f"{prefix}-veth1"))
        self.addresses = tuple(addresses or (f"10.231.{subnet}.1", f"10.231.{subnet}.2"))
        for name in self.veths:
            if len(name) > 15:
                raise ValueError(f"NamespaceHosts: interface name '{name}' is longer than 15 characters")
        if not (len(self.namespaces) == len(self.veths) == len(self.addresses) == 2):
            raise ValueError("NamespaceHosts: two namespaces, two interfaces and two addresses")

    def make(self) -> None:
        """Creates both namespaces (removing leftovers of an earlier run first)."""
        self.remove()
        ns, veth = self.namespaces, self.veths
        steps = [("netns", "add", ns[0]), ("netns", "add", ns[1]),
                 ("link", "add", veth[0], "type", "veth", "peer", "name", veth[1]),
                 ("link", "set", veth[0], "netns", ns[0]), ("link", "set", veth[1], "netns", ns[1])]
        for i in (0, 1):
            steps += [("-n", ns[i], "addr", "add", f"{self.addresses[i]}/24", "dev", veth[i]),
                      ("-n", ns[i], "link", "set", veth[i], "up"), ("-n", ns[i], "link", "set", "lo", "up")]
        for step in steps:
            res = _ip(*step)
            if res.returncode != 0:
                self.remove()
                raise RuntimeError(f"ip {' '.join(step)}: {res.stderr.strip()}")

    def kill(self, node: int) -> None:
        """SIGKILLs every process in host ``node``'s namespace (torchrun starts
        its workers in sessions of their own, so a process group is not enough)."""
        for pid in _ip("netns", "pids", self.namespaces[node]).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def remove(self) -> None:
        """Kills what runs in the namespaces and deletes them (the veth pair goes with them)."""
        for node, ns in enumerate(self.namespaces):
            self.kill(node)
            _ip("netns", "del", ns)

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``node``."""
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def env(self, node: int) -> dict[str, str]:
        """Environment for a job on host ``node``: gloo picks its interface from
        the host name otherwise (which resolves outside the namespace)."""
        return {"GLOO_SOCKET_IFNAME": self.veths[node]}

    def __enter__(self) -> NamespaceHosts:
        self.make()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
