"""Decentralised training over unreliable networks: peers that find each other,
train locally and average now and then (DiLoCo and hivemind style).

There is no central rank and no fixed world. Each :class:`Peer` listens on two
ports: a control port (membership, matchmaking, state download; small
HMAC-signed JSON messages) and a data port (the averaging itself, in C++:
``csrc/strategies/group_averager.cpp``, a butterfly all-reduce in which every
contribution reaches its owner alone and is checked before it is averaged).

- **Membership**: a peer starts from an initial peer list (any reachable peer
  will do; none at all makes it the first), learns the others from each
  other's heartbeats, and drops a peer not heard from for ``peer_timeout``
  seconds. A peer's id starts with its start time, so the oldest live peer is
  the leader of matchmaking; when it dies the next oldest takes over.
- **Joining**: a new peer downloads the current state (model, inner and outer
  optimizer, round number) from the leader, in the snapshot format (checksummed
  on both ends), and contributes from the next round.
- **Rounds**: with ``local_steps=H`` (DiLoCo) a peer enters matchmaking after
  H local optimizer steps and the round averages the parameter deltas, which
  an outer optimizer (SGD with Nesterov momentum) applies; with
  ``target_batch_size=B`` (hivemind) peers accumulate gradients until the
  peers' samples together reach B, then average the gradients (weighted by
  samples) and all take the same optimizer step. The leader forms a group of
  the peers ready within ``matchmaking_window`` seconds (at least
  ``min_group_size``), the group averages, and the leader commits the round
  only if every member completed it; otherwise every member keeps its
  pre-round state and the round is retried without the failed members. A
  peer that missed a committed round downloads the state again.
- **Bad peers**: a message with a wrong secret, wrong shape, wrong dtype or
  non-finite values is rejected with a logged reason (``Peer.rejections``) and
  never averaged in; the peer that sent it is left out of later groups.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _C
from .. import snapshot
from .._atomic import umask, write_atomically
from ._common import evaluate, split_epoch

log = logging.getLogger("disttrain.decentralised")

_FRAME = struct.Struct("!I32s")
_MAX_CONTROL_BYTES = 1 << 20
_WIRE = {None: "float32", "none": "float32", "bf16": "bfloat16", "int8": "int8"}


class DecentralisedError(RuntimeError):
    """A decentralised peer could not do what was asked (start, join, download)."""


@dataclass
class DecentralisedConfig:
    """How peers train and average. Exactly one of ``local_steps`` (DiLoCo: H
    local steps per round, parameter deltas averaged, outer optimizer) and
    ``target_batch_size`` (hivemind: gradients accumulated until the peers
    together reach B samples, then averaged) is set."""

    local_steps: int | None = 50
    target_batch_size: int | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    min_group_size: int = 2
    matchmaking_window: float = 2.0
    round_timeout: float = 30.0
    compression: str | None = None
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    max_attempts: int = 3

    def validate(self) -> None:
        if (self.local_steps is None) == (self.target_batch_size is None):
            raise ValueError("set exactly one of local_steps (DiLoCo) and target_batch_size (hivemind)")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {self.local_steps}")
        if self.target_batch_size is not None and self.target_batch_size < 1:
            raise ValueError(f"target_batch_size must be at least 1, got {self.target_batch_size}")
        if self.compression not in _WIRE:
            raise ValueError(f"compression {self.compression!r}: choose from none, bf16, int8")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be at least 1, got {self.min_group_size}")
        for name in ("matchmaking_window", "round_timeout", "heartbeat_interval", "peer_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.peer_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(f"peer_timeout ({self.peer_timeout} s) must exceed two heartbeat intervals "
                             f"({self.heartbeat_interval} s each)")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be a whole number of at least 1, got {self.max_attempts!r} "
                             "(0 would skip every round: training alone, never averaging)")
        if not (math.isfinite(self.outer_lr) and self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError(f"outer_lr must be positive and outer_momentum in [0, 1), got {self.outer_lr}, "
                             f"{self.outer_momentum}")


@dataclass
class PeerStats:
    """What a peer did: rounds committed, who it saw, what it sent."""

    rounds: int = 0
    attempts_failed: int = 0
    peers_seen: set[str] = field(default_factory=set)
    group_sizes: list[int] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_received: list[int] = field(default_factory=list)
    resyncs: int = 0
    zero_updates: int = 0
    local_steps: int = 0
    samples: int = 0


def parse_peers(text: str | Sequence[str] | None, allow_port_zero: bool = False) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (or a list of such) as ``[(host, port)]``; a
    clear error for anything else. Port 0 (any free port) only with ``allow_port_zero``."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 if allow_port_zero else 1) <= int(port) < 65536:
            raise ValueError(f"initial peer {item!r} is not host:port")
        out.append((host, int(port)))
    return out


def _token(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, b"disttrain-decentralised:" + purpose, hashlib.sha256).digest()


# ----------------------------------------------------------------------------- control messages

def _send_frame(sock: socket.socket, key: bytes, body: bytes) -> None:
    sock.sendall(_FRAME.pack(len(body), hmac.new(key, body, hashlib.sha256).digest()) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket, key: bytes, limit: int) -> bytes:
    length, mac = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if length > limit:
        raise ValueError(f"message of {length} bytes is above the limit of {limit}")
    body = _recv_exact(sock, length)
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise PermissionError("bad signature (wrong secret?)")
    return body


def _request(addr: tuple[str, int], key: bytes, message: dict, timeout: float,
             blob_limit: int = 0) -> tuple[dict, bytes | None]:
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.settimeout(timeout)
        _send_frame(sock, key, json.dumps(message).encode())
        reply = json.loads(_recv_frame(sock, key, _MAX_CONTROL_BYTES))
        blob = _recv_frame(sock, key, blob_limit) if blob_limit and reply.get("blob") else None
        return reply, blob


@dataclass
class _Member:
    peer_id: str
    host: str
    port: int
    data_port: int
    last_seen: float
    round: int = 0
    samples: int = 0
    lineage: str = ""


@dataclass
class _Attempt:
    round: int
    number: int
    deadline: float
    joined: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # id -> (host, data_port, weight)
    group: list[str] | None = None
    retry: bool = False
    outcomes: dict[str, bool] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    verdict: str | None = None


class Peer:
    """One participant of decentralised training. Usage::

        peer = Peer(model, torch.optim.AdamW(model.parameters()), initial_peers="10.0.0.1:7000",
                    config=DecentralisedConfig(local_steps=50), secret=b"job secret")
        peer.start()
        for x, y in loader:
            loss = peer.train_step(x, y, F.cross_entropy)
        peer.close()

    ``train_step`` runs forward, backward and the inner optimizer step, and
    takes part in a round when one is due (it then returns after the round).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 initial_peers: str | Sequence[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 secret: bytes | str | None = None, config: DecentralisedConfig | None = None,
                 peer_id: str | None = None):
        self.config = config or DecentralisedConfig()
        self.config.validate()
        params = list(model.parameters())
        if not params or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
            raise ValueError("decentralised training needs float32 CPU parameters")
        if secret is None:
            env = os.environ.get("DISTTRAIN_PEER_SECRET")
            if env is None:
                log.warning("no secret given (secret= or DISTTRAIN_PEER_SECRET): any host that reaches these "
                            "ports can join and send updates")
            secret = env or "disttrain-public"
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        self._control_key = _token(raw, b"control")
        self.model, self.optimizer, self.params = model, optimizer, params
        # Floating buffers (BatchNorm's running statistics) travel after the parameters' part of a
        # round's vector and are set to the group's mean, so equal peers evaluate alike.
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.host = host
        self.initial_peers = parse_peers(initial_peers)
        self.peer_id = peer_id or f"{time.time_ns():020d}-{host}:{os.getpid()}-{secrets.token_hex(2)}"
        self.lineage = self.peer_id
        self.round = 0
        self.stats = PeerStats()
        self.rejections: list[str] = []
        self.left_out = False  # the leader leaves this peer out of all rounds (another peer rejected its message)
        self._anchor = torch.nn.utils.parameters_to_vector(params).detach().clone()
        self._outer_momentum = torch.zeros_like(self._anchor)
        self._steps_in_round = 0
        self._samples_in_round = 0
        self._lock = threading.RLock()
        self._members: dict[str, _Member] = {}
        self._banned: dict[str, float] = {}
        self._suspects: dict[str, float] = {}
        self._published: dict[str, Any] | None = None
        self._attempts: dict[int, _Attempt] = {}
        self._committed: dict[int, list[str]] = {}
        self._mm = threading.Condition()
        self._closing = threading.Event()
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                peer._handle(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        # The control port first: the data port is any free port, which could otherwise take a
        # port just freed that the caller chose for the control port.
        try:
            self._server = Server((host, port), Handler)
        except OSError as e:
            raise DecentralisedError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        try:
            self._averager = _C.GroupAverager(_token(raw, b"data"), 0)
        except BaseException:
            self._server.server_close()
            raise
        self.port = self._server.server_address[1]
        self._threads = [threading.Thread(target=self._server.serve_forever, name="dt-peer-control", daemon=True)]
        self._pool = futures.ThreadPoolExecutor(8, thread_name_prefix="dt-peer-heartbeat")

    # ------------------------------------------------------------------------- public

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, join_timeout: float = 60.0) -> None:
        """Starts listening, meets the initial peers and downloads the current
        state from the oldest of them; with no reachable initial peer this peer
        is the first and its model is the initial state. ``join_timeout``
        bounds the whole join (the wait for an initial peer to answer, 15 s or
        the peer timeout, included)."""
        if self._closing.is_set():
            raise DecentralisedError("start(): the peer is closed; make a new Peer")
        if self._threads[0].ident is not None:
            raise DecentralisedError("start(): the peer was already started")
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + join_timeout
        if self.initial_peers:
            # The initial peers were named to be joined: wait for one of them to answer (they may
            # still be starting) up to 15 s, or peer_timeout if longer, and never past join_timeout;
            # none means this peer is the first.
            waited = min(max(15.0, self.config.peer_timeout), join_timeout)
            first_wait = time.monotonic() + waited
            while not self._members and time.monotonic() < first_wait:
                self._heartbeat_once()
                if not self._members:
                    time.sleep(self.config.heartbeat_interval)
            if not self._members:
                log.warning("none of the initial peers (%s) answered within %.0f s: this peer starts alone, as the "
                            "first; it keeps calling them and joins their group when one answers",
                            ", ".join(f"{h}:{p}" for h, p in self.initial_peers), waited)
        older = [m for m in self._members.values() if m.peer_id < self.peer_id]
        if older:
            self._download(deadline)
        else:
            self._publish()
        hb = threading.Thread(target=self._heartbeat_loop, name="dt-peer-heartbeat", daemon=True)
        hb.start()
        self._threads.append(hb)
        log.info("peer %s listening on %s (data port %d), round %d, %d peers known", self.peer_id, self.address,
                 self._averager.port, self.round, len(self._members))

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Callable[..., torch.Tensor]) -> float:
        """One local step (forward, backward, and in DiLoCo mode the inner
        optimizer step); then a round if one is due. Returns the loss."""
        hivemind = self.config.target_batch_size is not None
        if not hivemind:
            self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(inputs), targets)
        n = len(targets)
        # hivemind mode accumulates sums of per-sample gradients across steps.
        (loss * n if hivemind else loss).backward()
        if not hivemind:
            self.optimizer.step()
        self._count(n)
        return float(loss.detach())

    def local_step_done(self, samples: int) -> bool:
        """For training loops that step the optimizer themselves (DiLoCo mode
        only): counts one local step of ``samples`` samples and runs a round
        if one is due. True when a round was committed."""
        if self.config.target_batch_size is not None:
            raise ValueError("local_step_done() is for local_steps (DiLoCo) rounds; with target_batch_size the "
                             "peer must hold the optimizer step: use train_step()")
        return self._count(samples)

    def _count(self, samples: int) -> bool:
        with self._lock:
            self._steps_in_round += 1
            self._samples_in_round += samples
            self.stats.local_steps += 1
            self.stats.samples += samples
        return self.run_round() if self._round_due() else False

    def run_round(self) -> bool:
        """Matchmaking and averaging now; True when a round was committed."""
        hivemind = self.config.target_batch_size is not None
        if self._behind():
            self._download(time.monotonic() + self.config.round_timeout)
            return False
        vec = self._round_vector()
        weight = float(self._samples_in_round) if hivemind else 1.0
        for _ in range(self.config.max_attempts):
            if self._closing.is_set():
                return False
            reply = self._ask_leader({"kind": "join", "round": self.round, "weight": weight})
            if reply is None or reply.get("kind") == "retry":
                if reply is not None and reply.get("banned") and not self.left_out:
                    self.left_out = True
                    log.warning("this peer is left out of all rounds: another peer rejected a message of its "
                                "(non-finite values after a divergence, a wrong shape or dtype?); it trains alone "
                                "from now on (see the other peers' logs for the reason)")
                if reply is not None and reply.get("alone"):
                    break
                continue
            if reply["kind"] == "resync":
                self._download(time.monotonic() + self.config.round_timeout)
                return False
            group: list[list] = reply["group"]
            ids = [g[0] for g in group]
            index = ids.index(self.peer_id)
            averaged = vec.clone()
            result = self._averager.average(averaged, _round_key(self.round, reply["attempt"]),
                                            [(g[1], g[2]) for g in group], index, weight,
                                            _WIRE[self.config.compression], self.config.round_timeout)
            self._note_refusals()
            gone = sorted({ids[i] for i in result["unreachable"]})
            bad = sorted({ids[i] for i, _ in result["rejected"]})
            for i, reason in result["rejected"]:
                self._reject(f"round {self.round}: rejected the message of {ids[i]}: {reason}")
            verdict = self._ask_leader({"kind": "outcome", "round": self.round, "attempt": reply["attempt"],
                                        "ok": not bad and not gone, "bad": bad, "gone": gone})
            self.stats.bytes_sent.append(int(result["bytes_sent"]))
            self.stats.bytes_received.append(int(result["bytes_received"]))
            if verdict is not None and verdict.get("kind") == "commit":
                self._apply(averaged)
                self.stats.rounds += 1
                self.stats.group_sizes.append(len(group))
                return True
            self.stats.attempts_failed += 1
            log.info("round %d attempt %d aborted (%s)", self.round, reply["attempt"],
                     ", ".join(f"{p} {'rejected' if p in bad else 'unreachable'}" for p in bad + gone)
                     or "another member's outcome")
        # No group this time: keep training locally; the round is tried again after the next step.
        return False

    def close(self) -> None:
        """Leaves: stops serving and averaging. Others drop this peer after
        ``peer_timeout`` seconds."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._mm:
            self._mm.notify_all()
        if self._threads[0].ident is not None:  # shutdown() waits for a serve_forever() that never ran
            self._server.shutdown()
        self._server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._averager.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def live_peers(self) -> list[str]:
        """Ids of the peers in this peer's view (itself excluded)."""
        with self._lock:
            return sorted(self._members)

    # ------------------------------------------------------------------------- rounds

    def _round_due(self) -> bool:
        c = self.config
        if c.local_steps is not None:
            return self._steps_in_round >= c.local_steps
        assert c.target_batch_size is not None
        with self._lock:
            others = sum(m.samples for m in self._members.values() if m.round == self.round)
        return self._samples_in_round + others >= c.target_batch_size

    def _behind(self) -> bool:
        """Whether a live peer of this peer's lineage has committed a round this one has not."""
        with self._lock:
            return any(m.round > self.round and m.lineage == self.lineage for m in self._members.values())

    def wait_for_peers(self, count: int, timeout: float = 60.0) -> None:
        """Blocks until ``count`` other peers are in this peer's view."""
        deadline = time.monotonic() + timeout
        while len(self.live_peers()) < count:
            if time.monotonic() > deadline:
                raise DecentralisedError(f"{len(self.live_peers())} of {count} peers seen after {timeout} s")
            time.sleep(self.config.heartbeat_interval / 2)

    def _round_vector(self) -> torch.Tensor:
        """The parameters' part (hivemind: the mean gradient; DiLoCo: the delta since the round
        began), then the floating buffers' values."""
        if self.config.target_batch_size is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            vec = torch.nn.utils.parameters_to_vector(grads).div_(max(self._samples_in_round, 1))
        else:
            vec = self._anchor - torch.nn.utils.parameters_to_vector(self.params).detach()
        if self.buffers:
            vec = torch.cat([vec, *(b.detach().reshape(-1).to(torch.float32) for b in self.buffers)])
        return vec.contiguous()

    def _apply(self, averaged: torch.Tensor) -> None:
        averaged, buffers = averaged[:self._anchor.numel()], averaged[self._anchor.numel():]
        if not bool(averaged.any()):
            self.stats.zero_updates += 1
            log.warning("round %d: the averaged update is exactly zero: no peer's parameters moved (learning "
                        "rate 0, frozen parameters or no data?)", self.round)
        with torch.no_grad():
            if self.config.target_batch_size is not None:
                offset = 0
                for p in self.params:
                    n = p.numel()
                    if p.requires_grad:  # a frozen one keeps grad None, so the optimizer skips it (weight decay)
                        p.grad = averaged[offset:offset + n].view_as(p).clone()
                    offset += n
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._anchor = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
            else:
                c = self.config
                # torch.optim.SGD's momentum and Nesterov formulas, on the averaged delta as gradient.
                if c.outer_momentum:
                    self._outer_momentum.mul_(c.outer_momentum).add_(averaged)
                    step = averaged.add(self._outer_momentum, alpha=c.outer_momentum) if c.nesterov \
                        else self._outer_momentum
                else:
                    step = averaged
                self._anchor.add_(step, alpha=-c.outer_lr)
                offset = 0
                for p in self.params:  # copied in place: the optimizer holds these tensors
                    p.copy_(self._anchor[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            offset = 0
            for b in self.buffers:
                b.copy_(buffers[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        with self._lock:
            self.round += 1
            self._steps_in_round = 0
            self._samples_in_round = 0
        self._publish()

    def state(self) -> dict[str, Any]:
        """This peer's state as of its last committed round (what a joining
        peer downloads): model, inner optimizer, outer momentum, round."""
        with self._lock:
            if self._published is None:
                raise DecentralisedError("the peer has not started")
            return self._published

    def restore(self, state: dict[str, Any]) -> None:
        """Loads a state from :meth:`state` (e.g. a snapshot from an earlier run)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state["outer_momentum"].shape != self._outer_momentum.shape:
                raise ValueError(f"outer momentum of {state['outer_momentum'].numel()} values, "
                                 f"{self._outer_momentum.numel()} parameters here")
        except (RuntimeError, ValueError, KeyError) as e:  # load_state_dict's message spans many lines
            detail = " ".join(str(e).split())
            raise DecentralisedError(f"the state (round {state.get('round', '?')}) does not fit this model or "
                                     f"optimizer; do all peers train the same model? ({detail[:300]})") from None
        with self._lock:
            self._outer_momentum = state["outer_momentum"].clone()
            self._anchor = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
            self.round = int(state["round"])
            self.lineage = str(state["lineage"])
            self._steps_in_round = 0
            self._samples_in_round = 0
            for p in self.params:
                p.grad = None
        self._publish()

    def _publish(self) -> None:
        state = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                 "optimizer": _clone(self.optimizer.state_dict()),
                 "outer_momentum": self._outer_momentum.clone(), "round": self.round, "lineage": self.lineage}
        with self._lock:
            self._published = state

    def _download(self, deadline: float) -> None:
        """The current state from the oldest live peer that has one."""
        last_error = "no live peer"
        while time.monotonic() < deadline and not self._closing.is_set():
            with self._lock:
                # The most advanced state first; among equals the oldest peer's.
                candidates = [m.peer_id for m in sorted(self._members.values(), key=lambda m: (-m.round, m.peer_id))]
            for pid in candidates:
                member = self._members.get(pid)
                if member is None:
                    continue
                try:
                    reply, blob = _request((member.host, member.port), self._control_key, {"kind": "get_state"},
                                           self.config.round_timeout, blob_limit=1 << 34)
                except (OSError, ValueError, PermissionError) as e:
                    last_error = f"{pid}: {e}"
                    continue
                if not reply.get("blob") or blob is None:
                    last_error = f"{pid}: {reply.get('error', 'no state yet')}"
                    continue
                self._load_state(blob)
                self.stats.resyncs += 1
                log.info("downloaded the state of round %d from %s", self.round, pid)
                return
            time.sleep(self.config.heartbeat_interval)
            self._heartbeat_once()
        raise DecentralisedError(f"could not download the current state from any peer ({last_error})")

    def _load_state(self, blob: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="disttrain-peer-") as folder:
            path = os.path.join(folder, "state.dtsnap")
            with open(path, "wb") as f:
                f.write(blob)
            state = snapshot.load(path)  # checks every checksum
        self.restore(state)

    # ------------------------------------------------------------------------- membership

    def _info(self) -> dict:
        return {"id": self.peer_id, "host": self.host, "port": self.port, "data_port": self._averager.port,
                "round": self.round, "samples": self._samples_in_round, "lineage": self.lineage}

    def _view(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"id": m.peer_id, "host": m.host, "port": m.port, "data_port": m.data_port,
                     "round": m.round, "samples": m.samples, "lineage": m.lineage, "age": now - m.last_seen}
                    for m in self._members.values()]

    def _merge(self, info: dict, direct: bool, age: float = 0.0) -> None:
        pid = info["id"]
        if pid == self.peer_id or age >= self.config.peer_timeout:
            return
        now = time.monotonic()
        with self._lock:
            m = self._members.get(pid)
            if m is None:
                m = _Member(pid, info["host"], int(info["port"]), int(info["data_port"]), now - age)
                self._members[pid] = m
                if pid not in self.stats.peers_seen:
                    log.info("peer %s at %s:%s joined the view", pid, m.host, m.port)
                self.stats.peers_seen.add(pid)
            if direct or now - age > m.last_seen:
                m.last_seen = now - age
                m.round, m.samples, m.lineage = int(info["round"]), int(info["samples"]), str(info["lineage"])

    def _heartbeat_once(self) -> None:
        with self._lock:
            known = {(m.host, m.port) for m in self._members.values()}
        targets = sorted((known | set(self.initial_peers)) - {(self.host, self.port)})
        message = {"kind": "heartbeat", "peer": self._info(), "view": self._view()}
        jobs = [self._pool.submit(_request, t, self._control_key, message, self.config.peer_timeout)
                for t in targets]
        for target, job in zip(targets, jobs):
            try:
                reply, _ = job.result()
            except Exception:  # noqa: BLE001 - an unreachable peer is what heartbeats are for
                continue
            try:
                self._merge(reply["peer"], direct=True)
                for entry in reply.get("view", []):
                    self._merge(entry, direct=False, age=float(entry.get("age", 0.0)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self._reject(f"malformed heartbeat reply from {target[0]}:{target[1]}: {type(e).__name__}: {e}")
        now = time.monotonic()
        with self._lock:
            for pid in [p for p, m in self._members.items() if now - m.last_seen > self.config.peer_timeout]:
                log.info("peer %s dropped from the view (not heard from for %.1f s)", pid,
                         now - self._members[pid].last_seen)
                del self._members[pid]
        with self._mm:
            self._mm.notify_all()

    def _heartbeat_loop(self) -> None:
        while not self._closing.wait(self.config.heartbeat_interval):
            try:
                self._heartbeat_once()
            except RuntimeError:  # the pool was shut down by close()
                if self._closing.is_set():
                    return
                log.exception("heartbeat failed; retrying")
            except Exception:  # noqa: BLE001 - membership must outlive any one bad round of heartbeats
                log.exception("heartbeat failed; retrying")

    def _leader(self) -> _Member | None:
        """The oldest live peer (None when it is this one)."""
        with self._lock:
            ids = [p for p in self._members if p not in self._banned]
        oldest = min(ids + [self.peer_id])
        return None if oldest == self.peer_id else self._members.get(oldest)

    def _ask_leader(self, message: dict) -> dict | None:
        message = {**message, "peer": self._info()}
        leader = self._leader()
        if leader is None:
            return self._matchmake(message)
        wait = self.config.matchmaking_window + 2 * self.config.round_timeout
        try:
            reply, _ = _request((leader.host, leader.port), self._control_key, message, wait)
            return reply
        except (OSError, ValueError, PermissionError) as e:
            log.info("leader %s did not answer (%s)", leader.peer_id, e)
            with self._lock:
                self._members.pop(leader.peer_id, None)
            return None

    def _note_refusals(self) -> None:
        for reason in self._averager.take_refusals():
            self._reject(reason)

    def _reject(self, reason: str) -> None:
        log.warning("rejected: %s", reason)
        with self._lock:
            self.rejections.append(reason)

    # ------------------------------------------------------------------------- serving

    def _handle(self, sock: socket.socket, client: tuple[str, int]) -> None:
        sock.settimeout(self.config.round_timeout)
        try:
            message = json.loads(_recv_frame(sock, self._control_key, _MAX_CONTROL_BYTES))
            kind = message.get("kind")
            if kind != "get_state":
                self._merge(message["peer"], direct=True)
            if kind == "heartbeat":
                for entry in message.get("view", []):
                    self._merge(entry, direct=False, age=float(entry.get("age", 0.0)))
                _send_frame(sock, self._control_key, json.dumps({"peer": self._info(), "view": self._view()}).encode())
            elif kind == "get_state":
                self._serve_state(sock)
            elif kind in ("join", "outcome"):
                _send_frame(sock, self._control_key, json.dumps(self._matchmake(message)).encode())
            else:
                raise ValueError(f"unknown message kind {kind!r}")
        except PermissionError as e:
            self._reject(f"control message from {client[0]}:{client[1]}: {e}")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as e:
            # A signed body that is not the expected JSON objects (a list, a number, a peer entry
            # that is a string: found by fuzz/python/decentralised_control_fuzzer.py) is malformed too.
            self._reject(f"malformed control message from {client[0]}:{client[1]}: {type(e).__name__}: {e}")
        except OSError:
            pass  # the other side went away; heartbeats will tell

    def _serve_state(self, sock: socket.socket) -> None:
        with self._lock:
            state = self._published
        if state is None:
            _send_frame(sock, self._control_key, json.dumps({"blob": False, "error": "not started"}).encode())
            return
        with tempfile.TemporaryDirectory(prefix="disttrain-peer-") as folder:
            path = os.path.join(folder, "state.dtsnap")
            snapshot.save(path, state, fsync=False)
            with open(path, "rb") as f:
                blob = f.read()
        _send_frame(sock, self._control_key, json.dumps({"blob": True, "round": state["round"]}).encode())
        _send_frame(sock, self._control_key, blob)

    # ------------------------------------------------------------------------- matchmaking (leader)

    def _matchmake(self, message: dict) -> dict:
        kind, r, pid = message["kind"], int(message["round"]), message["peer"]["id"]
        info = message["peer"]
        with self._mm:
            if kind == "outcome":
                return self._await_verdict(r, int(message["attempt"]), pid, bool(message["ok"]),
                                           list(message.get("bad", [])), list(message.get("gone", [])))
            if pid in self._banned:
                return {"kind": "retry", "alone": True, "banned": True}
            if info.get("lineage") != self.lineage or r < self.round or r in self._committed:
                return {"kind": "resync"}
            attempt = self._open_attempt(r)
            attempt.joined[pid] = (info["host"], int(info["data_port"]), float(message["weight"]))
            self._mm.notify_all()
            while attempt.group is None and not attempt.retry and not self._closing.is_set():
                if len(attempt.joined) >= self._expected(r) or time.monotonic() >= attempt.deadline:
                    self._form(attempt)
                    break
                self._mm.wait(min(0.05, max(attempt.deadline - time.monotonic(), 0.0)))
            if attempt.group is None or pid not in attempt.group:
                return {"kind": "retry", "alone": len(attempt.joined) < 2 and self._expected(r) < 2}
            group = [[g, *attempt.joined[g][:2]] for g in attempt.group]
            return {"kind": "group", "attempt": attempt.number, "group": group}

    def _expected(self, r: int) -> int:
        """How many peers could join round r now: this one and the live ones, neither banned
        (a message of theirs was rejected) nor suspected (unreachable in a recent round)."""
        now = time.monotonic()
        with self._lock:
            return 1 + sum(1 for p in self._members if p not in self._banned and self._suspects.get(p, 0) < now)

    def _open_attempt(self, r: int) -> _Attempt:
        attempt = self._attempts.get(r)
        if attempt is None or attempt.verdict is not None or attempt.retry:
            number = 0 if attempt is None else attempt.number + 1
            attempt = _Attempt(r, number, time.monotonic() + self.config.matchmaking_window)
            self._attempts = {k: v for k, v in self._attempts.items() if k >= r}  # forget older rounds
            self._attempts[r] = attempt
        return attempt

    def _form(self, attempt: _Attempt) -> None:
        need = min(self.config.min_group_size, self._expected(attempt.round))
        if len(attempt.joined) >= max(need, 1):
            attempt.group = sorted(attempt.joined)
        else:
            attempt.retry = True
        self._mm.notify_all()

    def _await_verdict(self, r: int, number: int, pid: str, ok: bool, bad: list[str], gone: list[str]) -> dict:
        attempt = self._attempts.get(r)
        if attempt is None or attempt.number != number or attempt.group is None or pid not in attempt.group:
            return {"kind": "abort"}
        attempt.outcomes[pid] = ok
        attempt.bad.update(b for b in bad if b != pid)
        for g in gone:  # left out of the retry; heartbeats decide whether it is really gone
            self._suspects[g] = time.monotonic() + 2 * self.config.peer_timeout
        self._mm.notify_all()
        deadline = time.monotonic() + self.config.round_timeout
        while attempt.verdict is None and not self._closing.is_set():
            with self._lock:
                # A member that left the view will never report: no need to wait for it.
                now = time.monotonic()
                waiting = [g for g in attempt.group if g not in attempt.outcomes
                           and (g == self.peer_id or (g in self._members and self._suspects.get(g, 0) < now))]
            if not waiting or time.monotonic() >= deadline:
                complete = len(attempt.outcomes) == len(attempt.group) and all(attempt.outcomes.values())
                attempt.verdict = "commit" if complete else "abort"
                if complete:
                    self._committed[r] = list(attempt.group)
                    self._committed = {k: v for k, v in self._committed.items() if k >= r - 16}
                else:
                    for b in attempt.bad:
                        if b not in self._banned:
                            log.warning("peer %s is left out of all further rounds: a message of its was rejected",
                                        b)
                        self._banned.setdefault(b, time.monotonic())
                self._mm.notify_all()
                break
            self._mm.wait(0.05)
        return {"kind": attempt.verdict or "abort"}


def _round_key(round_: int, attempt: int) -> int:
    return round_ * 1024 + attempt


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
          loss_fn: Callable[..., torch.Tensor], **peer_kwargs: Any) -> Peer:
    """Runs a :class:`Peer` over ``batches`` and closes it; returns it (its
    ``stats`` and ``model``)."""
    peer = Peer(model, optimizer, **peer_kwargs)
    try:
        peer.start()
        for x, y in batches:
            peer.train_step(x, y, loss_fn)
    finally:
        peer.close()
    return peer


# ----------------------------------------------------------------------------- `disttrain train --strategy decentralised`

PEER_COLUMNS = ["epoch", "wall_time_s", "train_loss", "test_loss", "test_acc", "rounds", "live_peers", "peers_seen",
                "mean_group_size", "bytes_sent", "bytes_received", "bytes_sent_per_round", "resyncs",
                "failed_attempts", "rejections"]


def _same_shapes(mine: dict, theirs: Any) -> bool:
    """Whether a saved model state has this model's keys and shapes."""
    return (isinstance(theirs, dict) and list(theirs) == list(mine)
            and all(getattr(theirs[k], "shape", None) == v.shape for k, v in mine.items()))


def _write_peer_rows(f: Any, rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, PEER_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def run_from_args(args: Any, model: nn.Module, optimizer: torch.optim.Optimizer, train_set: Any, test_set: Any,
                  configuration: dict[str, Any]) -> dict[str, Any]:
    """One peer of ``disttrain train --strategy decentralised`` (``args`` are its
    options): trains for the epochs or time budget, evaluating after each
    epoch; writes RUN/metrics.csv (the trainer's columns), RUN/peers.csv
    (rounds, peers, group sizes, bytes) and RUN/snapshots/peer.dtsnap (this
    peer's state, from which it resumes when no other peer is alive). Returns
    the history."""

    import torch.nn.functional as F

    from ..train_cli import run_name
    from ..train_metrics import write_metrics_csv

    config = DecentralisedConfig(
        local_steps=None if args.target_batch_size else args.local_steps,
        target_batch_size=args.target_batch_size, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
        min_group_size=args.min_group_size, matchmaking_window=args.matchmaking_window,
        compression=args.compression, round_timeout=args.timeout)
    if args.batch_size > len(train_set):  # whole batches only: no step at all, and a loss of 0 logged
        raise DecentralisedError(f"-b/--batch-size {args.batch_size} is more than the data set's {len(train_set)} "
                                 "training samples: a peer trains on whole batches only")
    if args.target_batch_size and args.target_batch_size > len(train_set):
        log.warning("--target-batch-size %d is more than one peer's whole epoch (%d samples): each round waits for "
                    "that many samples from all peers together, so rounds (and learning) will be rare",
                    args.target_batch_size, len(train_set))
    host, _, port = (args.listen or "127.0.0.1:0").rpartition(":")
    run_dir = os.path.join(args.save_location, run_name(args))
    os.makedirs(os.path.join(run_dir, "snapshots"), exist_ok=True)
    own = os.path.join(run_dir, "snapshots", "peer.dtsnap")
    peer = Peer(model, optimizer, initial_peers=args.initial_peers or os.environ.get("DISTTRAIN_INITIAL_PEERS"),
                host=host, port=int(port), config=config)
    epochs = args.epochs if args.epochs is not None else (10 ** 9 if args.time_budget else 10)
    budget = args.time_budget * 3600 if args.time_budget else math.inf
    history: dict[str, list[float]] = {k: [] for k in ("epoch_time", "test_time", "train_acc", "test_acc",
                                                        "train_loss", "test_loss")}
    rows: list[dict[str, Any]] = []
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256)
    start = time.monotonic()
    try:
        peer.start()
        if args.wait_for_peers:
            print(f"disttrain peer {peer.address}: waiting for {args.wait_for_peers} other peers", flush=True)
            peer.wait_for_peers(args.wait_for_peers, timeout=args.timeout)
        saved = snapshot.load(own) if not args.no_resume and os.path.exists(own) else None
        if saved is not None:
            another = DecentralisedError(f"{own} is the snapshot of another model or optimizer (this run folder's "
                                         "earlier run); use --no-resume or another --save-name")
            if peer.round == 0 and not peer.live_peers():
                try:
                    peer.restore(saved)
                except DecentralisedError:
                    raise another from None
                log.info("resumed round %d from %s", peer.round, own)
            elif not _same_shapes(model.state_dict(), saved.get("model")):
                raise another
            # The peer's own epochs so far (a snapshot before 3 Dec 2026 has none): its metrics.csv and
            # peers.csv go on from them, where a resumed peer rewrote them with its new epochs only.
            run = saved.get("run") or {}
            if run:
                history = {k: list(run["history"][k]) for k in history}
                rows = list(run["rows"])
        print(f"disttrain peer {peer.address} ({peer.peer_id}) started; {len(peer.live_peers())} other peers",
              flush=True)
        seed = int(hashlib.sha256(peer.peer_id.encode()).hexdigest()[:8], 16)
        earlier_s = rows[-1]["wall_time_s"] if rows else 0.0
        for epoch in range(len(history["train_loss"]), epochs):  # -e is the run's epochs in all, as the trainer's
            t0 = time.monotonic()
            if t0 - start >= budget:
                break
            order = split_epoch(len(train_set), 1, 0, epoch, seed).tolist()
            losses = []
            for x, y in torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=order,
                                                    drop_last=True, num_workers=args.num_workers):
                losses.append(peer.train_step(x, y, F.cross_entropy))
                if time.monotonic() - start >= budget:
                    break
            t1 = time.monotonic()
            test_loss, test_acc, _ = evaluate(model, test_loader, F.cross_entropy)
            history["epoch_time"].append(t1 - t0)
            history["test_time"].append(time.monotonic() - t1)
            history["train_acc"].append(math.nan)
            history["train_loss"].append(sum(losses) / max(len(losses), 1))
            history["test_acc"].append(test_acc)
            history["test_loss"].append(test_loss)
            s = peer.stats
            sent, received = sum(s.bytes_sent), sum(s.bytes_received)
            rows.append({"epoch": epoch, "wall_time_s": round(earlier_s + time.monotonic() - start, 3),
                         "train_loss": history["train_loss"][-1], "test_loss": test_loss, "test_acc": test_acc,
                         "rounds": s.rounds, "live_peers": len(peer.live_peers()), "peers_seen": len(s.peers_seen),
                         "mean_group_size": sum(s.group_sizes) / len(s.group_sizes) if s.group_sizes else 0,
                         "bytes_sent": sent, "bytes_received": received,
                         "bytes_sent_per_round": sent / s.rounds if s.rounds else 0, "resyncs": s.resyncs,
                         "failed_attempts": s.attempts_failed, "rejections": len(peer.rejections)})
            write_metrics_csv(os.path.join(run_dir, "metrics.csv"), history,
                              {**configuration, "distributed_strategy": "decentralised", "is_distributed": True,
                               "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                               "momentum": args.momentum, "weight_decay": args.weight_decay,
                               "optimizer": "SGD", "criterion": "CrossEntropyLoss", "num_epochs": epochs})
            write_atomically(os.path.join(run_dir, "peers.csv"), lambda f: _write_peer_rows(f, rows),
                             mode=0o666 & ~umask())
            snapshot.save(own, {**peer.state(), "run": {"history": history, "rows": rows}})
            if not args.no_progress:
                print(f"peer {peer.address} epoch {epoch + 1}: loss {history['train_loss'][-1]:.4f}, test acc "
                      f"{test_acc:.4f}, round {peer.round}, {len(peer.live_peers()) + 1} peers live, mean group "
                      f"{rows[-1]['mean_group_size']:.1f}, {sent / 1e6:.2f} MB sent", flush=True)
    finally:
        peer.close()
    return {"history": history, "peers": rows, "peer_id": peer.peer_id}
