"""A parameter server on the disttrain backend: server ranks own the parameters
and the optimizer, workers pull versioned parameters and push gradients.

    model, stats = launch_ps_and_workers(4, 1, train_loader, test_loader, mode="ssp", staleness=2)

``launch_ps_and_workers`` starts ``world_size`` processes (spawn, one torch
thread each, a free port, a TCPStore held by the caller so it outlives any
rank). Ranks ``0 .. num_servers-1`` are servers, each owning a contiguous
slice of the flattened parameters and the optimizer state of that slice; the
other ranks are workers, each training on its own disjoint part of the data.
Everything travels over the backend's point-to-point ops (``isend``/``irecv``);
the C++ side is the backend itself (``csrc/comm/backend.cpp``), nothing here
needs a lock.

Note [one group per server-worker pair]: a disttrain group has one progress
thread that runs its ops in issue order, and ``recv`` from any source is not
supported (``csrc/comm/tcp/send_recv.cpp`` names its source). A server that
posted ``irecv`` from worker 1 on a shared group could not take worker 2's
message before worker 1 sent. So every (server, worker) pair gets its own
2-rank group (``dist.new_group``, called by every rank in the same order);
each has its own progress thread, a server keeps one ``irecv`` posted per
worker and polls ``Work.is_completed()``, sleeping 20 us .. 1 ms when nothing
is ready (never a busy spin). A dead worker fails only its own pair group:
the server sees its connection close and goes on (or stops, in sync mode).

Consistency. The parameters carry a version (the number of optimizer steps a
server applied); a gradient carries the version it was computed on and its
staleness is the server's version when it is applied minus that version.

* ``sync``: one optimizer step per version with the average of every active
  worker's gradient for that version: data-parallel training on the union of
  the workers' batches (staleness 0).
* ``ssp`` (bounded staleness, ``staleness=s``): no gradient with staleness > s
  is ever applied. ``policy="wait"``: the server holds workers back instead:
  it hands parameters out only while every gradient in flight can still be
  applied within the bound, applying them in version order (in effect at most
  s + 1 gradients in flight; s = 0 is serial SGD); ``policy="drop"``: workers
  never wait, a gradient staler than s is discarded (counted, logged) and the
  worker gets fresh parameters.
* ``async``: every gradient is applied as it arrives (staleness logged).

With several servers each one runs the rule on its own slice (its own version
counter). ``ssp`` with ``policy="wait"`` is refused with several servers: the
servers' independent waits can close a cycle (seen in testing), and a refused
setting is better than a job that stops at the timeout.

The parameters are the model's trainable parameters (requires_grad=True, one
floating-point dtype; a frozen one keeps its value); buffers (BatchNorm statistics) are not synchronised: the returned model takes
them from the first worker.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Iterable, Sized, cast

import torch
from torch import nn

from .._processes import describe_exit, start_single_threaded, stop
from . import _common

__all__ = ["launch_ps_and_workers", "ParameterServerStats", "ParameterServerError", "worker_indices", "evaluate",
           "MODES", "POLICIES"]

MODES = ("sync", "ssp", "async")
POLICIES = ("wait", "drop")

# Every message is one uint8 buffer: an int64 header, then the payload (a
# slice of parameters or of gradients, always the full slice size so that the
# receiver knows the size of the next message on a pair group in advance).
_HEADER_BYTES = 64
_H_KIND, _H_VERSION, _H_FLAGS, _H_STEP = 0, 1, 2, 3
_PARAMS, _GRAD, _DONE, _FIN = 1, 2, 4, 5
_LAST, _WANTS_PARAMS, _DROPPED = 1, 2, 4


class ParameterServerError(RuntimeError):
    """A server or worker failed; the message names the rank, its role and its exception."""


@dataclasses.dataclass
class ParameterServerStats:
    """What :func:`launch_ps_and_workers` measured.

    Times are seconds since training began (all ranks ready, after a barrier).
    ``updates`` counts server 0's optimizer steps; ``gradients_applied`` and
    ``gradients_dropped`` count worker gradients at server 0 (in sync mode one
    update averages several gradients). ``staleness_log`` has one
    ``(server, worker_rank, staleness, applied)`` row per gradient received.
    ``accuracy_history`` is ``(time, updates, test accuracy)`` of the server's
    parameters every ``eval_every`` updates (evaluated after the run, so the
    measurement never slows training).
    """

    mode: str
    staleness: int | None
    policy: str | None
    world_size: int
    num_servers: int
    num_workers: int
    elapsed: float
    wall: float
    epoch_times: list[float]
    updates: int
    gradients_applied: int
    gradients_dropped: int
    updates_per_second: float
    samples: int
    losses: list[tuple[float, float]]
    worker_losses: dict[int, list[tuple[float, float]]]
    accuracy_history: list[tuple[float, int, float]]
    final_accuracy: float | None
    staleness_log: list[tuple[int, int, int, bool]]
    max_applied_staleness: int
    dead_workers: list[int]

    def time_to_accuracy(self, target: float) -> float | None:
        """Seconds until the test accuracy first reached ``target`` (None: never)."""
        return next((t for t, _, acc in self.accuracy_history if acc >= target), None)

    def as_dict(self) -> dict[str, Any]:
        """A flat summary (no histories), for a CSV row."""
        return {"mode": self.mode, "staleness": self.staleness, "policy": self.policy, "world_size": self.world_size,
                "num_servers": self.num_servers, "num_workers": self.num_workers, "elapsed_s": self.elapsed,
                "wall_s": self.wall, "updates": self.updates, "gradients_applied": self.gradients_applied,
                "gradients_dropped": self.gradients_dropped, "updates_per_s": self.updates_per_second,
                "samples": self.samples, "final_accuracy": self.final_accuracy,
                "max_applied_staleness": self.max_applied_staleness, "dead_workers": len(self.dead_workers)}


def worker_indices(num_samples: int, num_workers: int, worker: int, epoch: int, seed: int = 42,
                   shuffle: bool = True) -> list[int]:
    """The sample indices worker ``worker`` (0-based) trains on in ``epoch``.

    One permutation per epoch (``seed + epoch``), dealt round-robin: the
    workers' parts are disjoint and together hold every sample exactly once
    (no padding, unlike ``DistributedSampler``); parts differ by at most one.

    Example:
        >>> worker_indices(10, 3, 0, epoch=0, shuffle=False)
        [0, 3, 6, 9]
    """
    return _common.split_epoch(num_samples, num_workers, worker, epoch, seed, shuffle).tolist()


def _batches(num_samples: int, num_workers: int, worker: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch of one worker's part (see :func:`worker_indices`)."""
    part = len(range(worker, num_samples, num_workers))
    return part // batch_size if drop_last else math.ceil(part / batch_size)


def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Accuracy of ``model`` (classification, argmax) over ``loader``, on one thread
    (small models on a shared machine evaluate faster so than on several)."""
    return _common.evaluate(model, loader, threads=1)[1]


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _slices(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of n elements, sizes differing by at most one."""
    bounds = [k * (n // parts) + min(k, n % parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the servers own: those that require a gradient (a frozen
    one keeps its value on every rank and in the returned model)."""
    return [p for p in model.parameters() if p.requires_grad]


def _numpy(t: torch.Tensor) -> Any:
    """``t`` as a numpy array for the result queue; a dtype numpy lacks
    (bfloat16, float8) goes as float32, which holds it exactly."""
    t = t.detach().cpu().clone()
    try:
        return t.numpy()
    except TypeError:
        return t.float().numpy()


def _flat_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Makes every trainable parameter (and its gradient) a view of one flat tensor."""
    params = _trainable(model)
    n = sum(p.numel() for p in params)
    flat = torch.empty(n, dtype=params[0].dtype)
    grad = torch.zeros(n, dtype=params[0].dtype)
    offset = 0
    for p in params:
        k = p.numel()
        flat[offset:offset + k].copy_(p.detach().reshape(-1))
        p.data = flat[offset:offset + k].view_as(p)
        p.grad = grad[offset:offset + k].view_as(p)
        offset += k
    return flat, grad


class _Message:
    """One pre-allocated message buffer: header view and payload view."""

    def __init__(self, numel: int, dtype: torch.dtype):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.buf = torch.zeros(_HEADER_BYTES + numel * itemsize, dtype=torch.uint8)
        self.header = self.buf[:_HEADER_BYTES].view(torch.int64)
        self.payload = self.buf[_HEADER_BYTES:].view(dtype)

    def fill(self, kind: int, version: int, flags: int = 0, step: int = 0, payload: torch.Tensor | None = None):
        self.header[_H_KIND], self.header[_H_VERSION], self.header[_H_FLAGS], self.header[_H_STEP] = \
            kind, version, flags, step
        if payload is not None:
            self.payload.copy_(payload)

    def read(self) -> tuple[int, int, int, int]:
        h = self.header.tolist()
        return h[_H_KIND], h[_H_VERSION], h[_H_FLAGS], h[_H_STEP]


# --- the server's consistency rule (no I/O: tested on its own) ------------------------------------

class _ServerCore:
    """Decides when a gradient is applied, dropped or held, and when a worker
    gets parameters. ``apply(grads)`` runs one optimizer step with the mean of
    ``grads``; ``send_params(worker, dropped)`` hands the current version out;
    ``send_fin(worker)`` acknowledges a worker's last message."""

    def __init__(self, workers: list[int], mode: str, staleness: int, policy: str,
                 apply: Callable[[list[torch.Tensor]], None], send_params: Callable[[int, bool], None],
                 send_fin: Callable[[int], None], server: int = 0):
        self.mode, self.s, self.policy, self.server = mode, staleness, policy, server
        self.apply_fn, self.send_params, self.send_fin = apply, send_params, send_fin
        self.version = 0
        self.active = set(workers)
        self.pending: dict[int, int] = {}  # worker -> version handed out, gradient not yet applied or dropped
        self.held: dict[int, tuple[int, int, torch.Tensor, bool]] = {}  # wait policy: worker -> (version, arrival, grad, wants)
        self.waiting: collections.deque[int] = collections.deque()  # workers asking for parameters
        self.round: dict[int, torch.Tensor] = {}  # sync: this version's gradients
        self.leaving: set[int] = set()  # sync: workers whose last gradient is in the round
        self.log: list[tuple[int, int, int, bool]] = []  # (server, worker, staleness, applied)
        self.applied = self.dropped = 0
        self._arrivals = 0

    @property
    def finished(self) -> bool:
        return not self.active and not self.held

    def _waits(self) -> bool:
        return self.mode == "ssp" and self.policy == "wait"

    def _feasible(self, versions: list[int], version: int) -> bool:
        # Applying `versions` in ascending order from `version` on: the i-th is applied at version + i.
        return all(version + i - v <= self.s for i, v in enumerate(sorted(versions)))

    def request(self, worker: int) -> None:
        """``worker`` wants parameters (initially, or with a gradient)."""
        self.waiting.append(worker)
        self._admit()

    def _admit(self) -> None:
        while self.waiting:
            w = self.waiting[0]
            if w not in self.active:
                self.waiting.popleft()
                continue
            if self._waits() and not self._feasible(list(self.pending.values()) + [self.version], self.version):
                return  # FIFO: the first in line goes first, nobody overtakes it
            self.waiting.popleft()
            self.pending[w] = self.version
            self.send_params(w, False)

    def gradient(self, worker: int, version: int, grad: torch.Tensor, last: bool, wants: bool) -> None:
        """A gradient computed on ``version``. ``grad`` is only valid during the call."""
        staleness = self.version - version
        if last:
            self.send_fin(worker)
        if self.mode == "sync":
            self.round[worker] = grad.clone()
            if last:
                self.leaving.add(worker)
            self._try_round()
            return
        if self.mode == "async" or self.policy == "drop":
            self.pending.pop(worker, None)
            applied = self.mode == "async" or staleness <= self.s
            self.log.append((self.server, worker, staleness, applied))
            if applied:
                self.applied += 1
                self.apply_fn([grad])
                self.version += 1
            else:
                self.dropped += 1
            if last:
                self.active.discard(worker)
            elif wants:
                self.pending[worker] = self.version
                self.send_params(worker, not applied)
            return
        self._arrivals += 1
        self.held[worker] = (version, self._arrivals, grad.clone(), wants)
        if last:
            self.active.discard(worker)
        self._drain()
        self._admit()

    def _drain(self) -> None:
        """Wait policy: applies held gradients, oldest version first, while the bound allows."""
        progressed = True
        while progressed:
            progressed = False
            for w, (version, _, grad, wants) in sorted(self.held.items(), key=lambda kv: kv[1][:2]):
                others = [v for u, v in self.pending.items() if u != w]
                if self.version - version <= self.s and self._feasible(others, self.version + 1):
                    del self.held[w]
                    self.pending.pop(w, None)
                    self.log.append((self.server, w, self.version - version, True))
                    self.applied += 1
                    self.apply_fn([grad])
                    self.version += 1
                    if wants and w in self.active:
                        self.waiting.append(w)
                    progressed = True
                    break

    def _try_round(self) -> None:
        if not self.active or set(self.round) != self.active:
            return
        grads = [self.round[w] for w in sorted(self.round)]
        for w in sorted(self.round):
            self.log.append((self.server, w, 0, True))
        self.applied += len(grads)
        self.apply_fn(grads)
        self.version += 1
        self.active -= self.leaving
        self.leaving.clear()
        self.round.clear()
        for w in sorted(self.active):
            self.send_params(w, False)

    def done(self, worker: int) -> None:
        """``worker`` has nothing (more) to train on."""
        self.send_fin(worker)
        self.worker_gone(worker)

    def worker_gone(self, worker: int) -> None:
        self.active.discard(worker)
        self.pending.pop(worker, None)
        self.held.pop(worker, None)
        if self.mode == "sync":
            self.round.pop(worker, None)
            self._try_round()
        elif self._waits():
            self._drain()
            self._admit()


# --- the processes -------------------------------------------------------------------------------

def _poll_sleep(idle: int) -> None:
    time.sleep(min(2e-5 * (2 ** min(idle, 6)), 1e-3))


def _serve(rank: int, cfg: dict, groups: dict, start: Callable[[], float]) -> dict:
    import torch.distributed as dist

    server, num_servers = rank, cfg["num_servers"]
    workers = list(range(num_servers, cfg["world_size"]))
    lo, hi = cfg["slices"][server]
    flat = cfg["flat"][lo:hi].clone()
    param = nn.Parameter(flat)
    optimizer = cfg["optimizer"]([param])
    kill_after = cfg["kill_after"].get(rank)
    eval_every = cfg["eval_every"]
    snapshots: list[tuple[float, int, Any]] = [(0.0, 0, _numpy(param))]
    dtype = flat.dtype
    inbox = {w: _Message(hi - lo, dtype) for w in workers}
    outbox = {w: _Message(hi - lo, dtype) for w in workers}
    sends: dict[int, Any] = {}
    failed: dict[int, str] = {}
    t0 = start()  # after the set-up: building the first optimizer imports torch._dynamo (over a second)

    def apply(grads: list[torch.Tensor]) -> None:
        if len(grads) == 1:
            param.grad = grads[0]
        else:
            total = grads[0].clone()
            for g in grads[1:]:
                total += g
            param.grad = total.div_(len(grads))
        optimizer.step()
        param.grad = None
        updates = core.version + 1
        if eval_every and updates % eval_every == 0:
            snapshots.append((time.time() - t0, updates, _numpy(param)))
        if kill_after is not None and updates >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def send(w: int, kind: int, flags: int, payload: torch.Tensor | None) -> None:
        if w in failed:
            return
        if kind == _PARAMS and w in recvs:  # our own bug, never a worker's: two replies to one message
            raise AssertionError(f"parameter server rank {server}: a receive from worker rank {w} is already posted")
        try:
            if w in sends:
                sends.pop(w).wait()
            outbox[w].fill(kind, core.version, flags, 0, payload)
            sends[w] = dist.isend(outbox[w].buf, dst=w, group=groups[w])
            if kind == _PARAMS:
                # Posted after the send, never before: a group runs its ops in issue order (see the Note).
                recvs[w] = dist.irecv(inbox[w].buf, src=w, group=groups[w])
        except Exception as e:  # noqa: BLE001 - a dead worker: handled by the main loop
            failed[w] = str(e)

    core = _ServerCore(workers, cfg["mode"], cfg["staleness"], cfg["policy"],
                       apply=apply, send_params=lambda w, dropped: send(w, _PARAMS, _DROPPED if dropped else 0,
                                                                        param.detach()),
                       send_fin=lambda w: send(w, _FIN, 0, None), server=server)
    recvs: dict[int, Any] = {}  # at most one irecv posted per worker: the message expected next
    for w in workers:
        core.request(w)
    dead: list[int] = []

    def lost(w: int, why: str) -> None:
        recvs.pop(w, None)
        sends.pop(w, None)
        if w in dead or w not in core.active and w not in core.held:
            return
        role = f"worker rank {w} ({w - num_servers + 1} of {len(workers)})"
        if cfg["mode"] == "sync":
            raise ParameterServerError(f"parameter server rank {server}: {role} failed in synchronous mode; the "
                                       f"round for version {core.version} cannot complete: {why}")
        dead.append(w)
        warnings.warn(f"parameter server rank {server}: {role} failed and is dropped; training goes on with "
                      f"{len(core.active) - 1} workers: {why}", RuntimeWarning, stacklevel=1)
        core.worker_gone(w)

    last_message = time.monotonic()
    idle = 0
    while not core.finished:
        progressed = False
        for w in list(recvs):
            work = recvs[w]
            if not work.is_completed():
                continue
            progressed = True
            try:
                work.wait()
            except Exception as e:  # noqa: BLE001 - the pair group names the peer and the op
                lost(w, str(e).splitlines()[0])
                continue
            del recvs[w]
            kind, version, flags, _ = inbox[w].read()
            last, wants = bool(flags & _LAST), bool(flags & _WANTS_PARAMS)
            if kind == _GRAD:
                if cfg["mode"] == "sync" and version != core.version:
                    raise ParameterServerError(f"parameter server rank {server}: worker rank {w} sent a gradient "
                                               f"for version {version} in the round of version {core.version}")
                core.gradient(w, version, inbox[w].payload, last, wants)
            elif kind == _DONE:
                core.done(w)
            else:
                raise ParameterServerError(f"parameter server rank {server}: unexpected message kind {kind} "
                                           f"from worker rank {w}")
        for w, why in list(failed.items()):
            if w not in dead:
                lost(w, why)
        if progressed:
            last_message, idle = time.monotonic(), 0
            continue
        if time.monotonic() - last_message > cfg["timeout"]:
            waiting_for = sorted(core.active)
            raise ParameterServerError(f"parameter server rank {server}: no message from workers {waiting_for} "
                                       f"for {cfg['timeout']:.0f} s (timeout)")
        idle += 1
        _poll_sleep(idle)
    for w, work in list(sends.items()):
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - a worker that left after its FIN; nothing more to send it
            pass
    end = time.time() - t0
    if not eval_every or core.version % eval_every:
        snapshots.append((end, core.version, _numpy(param)))
    return {"role": "server", "slice": _numpy(param), "updates": core.version,
            "applied": core.applied, "dropped": core.dropped, "log": core.log, "snapshots": snapshots,
            "end": end, "dead": dead}


def _work(rank: int, cfg: dict, groups: dict, start: Callable[[], float]) -> dict:
    import torch.distributed as dist

    num_servers = cfg["num_servers"]
    num_workers = cfg["world_size"] - num_servers
    index = rank - num_servers
    torch.manual_seed(cfg["seed"] + 1000 + index)
    model: nn.Module = cfg["model"]
    model.train()
    flat, flat_grad = _flat_parameters(model)
    loss_fn = cfg["loss_fn"]
    servers = list(range(num_servers))
    slices = cfg["slices"]
    inbox = {s: _Message(hi - lo, flat.dtype) for s, (lo, hi) in enumerate(slices)}
    outbox = {s: _Message(hi - lo, flat.dtype) for s, (lo, hi) in enumerate(slices)}
    versions = {s: 0 for s in servers}
    kill_after = cfg["kill_after"].get(rank)
    me = f"worker rank {rank} ({index + 1} of {num_workers})"

    def wait(work, s: int, what: str) -> None:
        try:
            work.wait()
        except Exception as e:  # noqa: BLE001 - re-raised with the server's rank
            raise ParameterServerError(f"{me}: lost parameter server rank {s} while {what}: "
                                       f"{str(e).splitlines()[0]}") from None

    def send(s: int, kind: int, flags: int, payload: torch.Tensor | None) -> Any:
        outbox[s].fill(kind, versions[s], flags, steps, payload)
        return dist.isend(outbox[s].buf, dst=s, group=groups[s])

    def receive(s: int, expect: int) -> int:
        work = dist.irecv(inbox[s].buf, src=s, group=groups[s])
        wait(work, s, "waiting for parameters" if expect == _PARAMS else "finishing")
        kind, version, flags, _ = inbox[s].read()
        if kind != expect:
            raise ParameterServerError(f"{me}: expected message kind {expect} from server rank {s}, got {kind}")
        if kind == _PARAMS:
            lo, hi = slices[s]
            flat[lo:hi].copy_(inbox[s].payload)
            versions[s] = version
        return flags

    def pull() -> int:
        dropped = 0
        for s in servers:
            dropped += bool(receive(s, _PARAMS) & _DROPPED)
        return dropped

    dataset, batch_size, collate, drop_last, shuffle = cfg["data"]
    total_steps = cfg["epochs"] * _batches(len(dataset), num_workers, index, batch_size, drop_last)
    steps = samples = 0
    losses: list[tuple[float, float]] = []
    epoch_ends: list[float] = []
    if total_steps == 0:
        t0 = start()
        pull()
        for s in servers:
            wait(send(s, _DONE, _LAST, None), s, "saying it is done")
            receive(s, _FIN)
        return {"role": "worker", "losses": losses, "epoch_ends": [0.0] * cfg["epochs"], "steps": 0, "samples": 0}
    pending_sends: list[tuple[Any, int]] = []
    x, y = _common.split_batch(next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                                     collate_fn=collate))))
    loss_fn(model(x), y).backward()  # warm-up, untimed (first-call costs); the gradient is zeroed below
    t0 = start()
    pull()
    for epoch in range(cfg["epochs"]):
        indices = worker_indices(len(dataset), num_workers, index, epoch, cfg["seed"], shuffle)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices,
                                             collate_fn=collate, drop_last=drop_last)
        for batch in loader:
            x, y = _common.split_batch(batch)  # (input, target, ...) as the evaluation takes it
            for work, s in pending_sends:
                wait(work, s, "pushing a gradient")
            pending_sends.clear()
            flat_grad.zero_()
            loss = loss_fn(model(x), y)
            loss.backward()
            steps += 1
            samples += len(y)
            last = steps == total_steps
            value = loss.item()
            losses.append((time.time() - t0, value))
            if cfg["log_interval"] > 0 and steps % cfg["log_interval"] == 0:
                print(f"[ps {me}] epoch {epoch} step {steps} loss {value:.4f}", flush=True)
            for s in servers:
                lo, hi = slices[s]
                flags = (_LAST if last else 0) | _WANTS_PARAMS
                pending_sends.append((send(s, _GRAD, flags, flat_grad[lo:hi]), s))
            if kill_after is not None and steps >= kill_after:
                for work, s in pending_sends:
                    wait(work, s, "pushing a gradient")
                os.kill(os.getpid(), signal.SIGKILL)
            if not last:
                pull()
        epoch_ends.append(time.time() - t0)
    for s in servers:
        receive(s, _FIN)
    for work, s in pending_sends:
        wait(work, s, "pushing its last gradient")
    out: dict[str, Any] = {"role": "worker", "losses": losses, "epoch_ends": epoch_ends, "steps": steps,
                           "samples": samples}
    if index == 0:
        out["buffers"] = {k: _numpy(v) for k, v in model.named_buffers()}
    return out


def _rank_main(rank: int, payload_path: str, store_port: int, results) -> None:
    try:
        torch.set_num_threads(1)
        import cloudpickle
        import torch.distributed as dist

        import disttrain

        with open(payload_path, "rb") as f:
            cfg = cloudpickle.load(f)
        world_size, num_servers = cfg["world_size"], cfg["num_servers"]
        timeout = datetime.timedelta(seconds=cfg["timeout"])
        options = disttrain.BackendOptions(transport="tcp")  # point-to-point runs over TCP anyway: no shm segments
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("disttrain", store=store, rank=rank, world_size=world_size, timeout=timeout,
                                pg_options=options)
        groups: dict[int, Any] = {}
        for s in range(num_servers):  # every rank creates every pair group, in the same order
            for w in range(num_servers, world_size):
                group = dist.new_group([s, w], timeout=timeout, backend="disttrain", pg_options=options)
                if rank == s:
                    groups[w] = group
                elif rank == w:
                    groups[s] = group
        def start() -> float:
            dist.barrier()
            return time.time()

        value = _serve(rank, cfg, groups, start) if rank < num_servers else _work(rank, cfg, groups, start)
        dist.destroy_process_group()
        results.put(("ok", rank, value))
    except BaseException as e:  # report everything, including SystemExit
        text = str(e) if isinstance(e, ParameterServerError) else traceback.format_exc()
        results.put(("error", rank, text))
    # The groups are destroyed (or failed): once the result is through the pipe, skip the
    # interpreter's finalization (most of a rank's exit time here).
    results.close()
    results.join_thread()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _role(rank: int, num_servers: int, world_size: int) -> str:
    if rank < num_servers:
        return f"rank {rank} (server {rank + 1} of {num_servers})"
    return f"rank {rank} (worker {rank - num_servers + 1} of {world_size - num_servers})"


def _run_processes(payload: bytes, world_size: int, timeout: float) -> tuple[dict[int, Any], dict[int, str], dict[int, str]]:
    """Starts the ranks and collects their results; returns (results, errors, deaths)."""
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    # The payload (model, data) goes through a file: passed as an argument, each start() would block
    # until that child had imported torch and read it, starting the ranks one after the other.
    workdir = tempfile.TemporaryDirectory(prefix="disttrain-ps-")
    payload_path = os.path.join(workdir.name, "payload.pkl")
    with open(payload_path, "wb") as f:
        f.write(payload)
    procs = [ctx.Process(target=_rank_main, args=(r, payload_path, store.port, results), daemon=True,
                         name=f"disttrain-ps-{r}") for r in range(world_size)]
    start_single_threaded(procs)
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deaths: dict[int, str] = {}
    first_failure: float | None = None
    try:
        while len(done) + len(errors) + len(deaths) < world_size:
            try:
                status, rank, value = results.get(timeout=0.2)
                (done if status == "ok" else errors)[rank] = value
                if status != "ok" and first_failure is None:
                    first_failure = time.monotonic()
                continue
            except queue.Empty:
                pass
            gone = [r for r, p in enumerate(procs)
                    if not p.is_alive() and r not in done and r not in errors and r not in deaths]
            if gone:
                time.sleep(0.3)  # its last message may still be in the pipe
                while True:
                    try:
                        status, rank, value = results.get_nowait()
                    except queue.Empty:
                        break
                    (done if status == "ok" else errors)[rank] = value
                for r in gone:
                    if r not in done and r not in errors:
                        deaths[r] = describe_exit(procs[r].exitcode) + " without reporting"
                        if first_failure is None:
                            first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > timeout + 10:
                for r, p in enumerate(procs):
                    if p.is_alive() and r not in done and r not in errors:
                        deaths[r] = f"did not finish within {timeout + 10:.0f} s of the first failure and was stopped"
                break
    finally:
        stop(procs, grace=5)
        results.close()
        results.join_thread()
        workdir.cleanup()
        del store
    return done, errors, deaths


def launch_ps_and_workers(world_size: int, epochs_per_worker: int, train_dataloader: torch.utils.data.DataLoader,
                          test_dataloader: Iterable | None = None, *,
                          model: nn.Module | Callable[[], nn.Module] | None = None,
                          optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                          loss_fn: Callable[..., torch.Tensor] | None = None, mode: str = "sync",
                          staleness: int = 2, policy: str = "wait", num_servers: int = 1, timeout: float = 60.0,
                          seed: int = 42, log_interval: int = 10, eval_every: int | None = None,
                          kill_after: dict[int, int] | None = None) -> tuple[nn.Module, ParameterServerStats]:
    """Trains ``model`` with ``num_servers`` parameter servers and
    ``world_size - num_servers`` workers, each a process of its own.

    Args:
        world_size: processes in all (servers + workers); at least ``num_servers + 1``.
        epochs_per_worker: passes each worker makes over its own part of the data.
        train_dataloader: its data set, batch size, collate function, ``drop_last``
            and shuffling (a ``RandomSampler``) are used; the data set is split
            between the workers (:func:`worker_indices`: each sample once per epoch).
        test_dataloader: evaluated after the run (final and ``eval_every`` snapshots); optional.
        model: a module or a factory; default ``disttrain.models.small_cnn()``.
            All ranks start from its parameters (one floating dtype).
        optimizer: ``params -> Optimizer``, run on each server's flat slice
            (one tensor); default SGD, lr 0.05, momentum 0.9.
        loss_fn: ``(output, target) -> loss``; default cross entropy.
        mode: ``"sync"`` (the default: equal to data-parallel training),
            ``"ssp"`` (bounded staleness) or ``"async"``.
        staleness: the bound s of ``ssp``: no gradient staler than s is applied.
        policy: ``ssp`` only: ``"wait"`` (workers are held back) or ``"drop"``
            (stale gradients are discarded).
        num_servers: server ranks, each owning a contiguous slice of the parameters.
        timeout: seconds for any one communication and for a server without
            messages; a failure is raised within it.
        seed: model initialisation (factory), data order and worker seeds.
        log_interval: a worker prints its loss every that many steps; -1: silent.
        eval_every: snapshot the parameters every that many updates for
            ``accuracy_history`` (default: about 20 over the run; 0: final only).
        kill_after: ``{rank: n}``: that rank kills itself (SIGKILL) after n
            steps (worker: gradients pushed; server: updates). For fault tests
            and demonstrations.

    Returns:
        ``(model, stats)``: a copy of the model with the servers' parameters
        and a :class:`ParameterServerStats`.

    Raises:
        ValueError: a bad argument (world size, mode, policy, staleness, ...).
        ParameterServerError: a process raised or died (naming its rank, role
            and exception); in ``async`` and ``ssp`` modes a worker that dies is
            dropped with a warning instead, and the run goes on.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from disttrain import data
        >>> train = DataLoader(data.digits(train=True), batch_size=32, shuffle=True)
        >>> test = DataLoader(data.digits(train=False), batch_size=256)
        >>> model, stats = launch_ps_and_workers(4, 1, train, test, mode="sync")
        >>> stats.final_accuracy, stats.elapsed
    """
    import cloudpickle

    from disttrain import models

    def bad_int(v: Any) -> bool:
        return isinstance(v, bool) or not isinstance(v, int)

    if bad_int(num_servers) or num_servers < 1:
        raise ValueError(f"num_servers must be an integer >= 1, got {num_servers!r}")
    if bad_int(world_size) or world_size < num_servers + 1:
        raise ValueError(f"world_size must be an integer >= num_servers + 1 = {num_servers + 1} (servers and at "
                         f"least one worker), got {world_size!r}")
    if bad_int(epochs_per_worker) or epochs_per_worker < 1:
        raise ValueError(f"epochs_per_worker must be an integer >= 1, got {epochs_per_worker!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if bad_int(staleness) or staleness < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    if mode == "ssp" and policy == "wait" and num_servers > 1:
        # Each server holds workers back on its own version counter; two servers' waits
        # can close a cycle (seen: 1 run in 4 timed out, workers and servers each waiting
        # for the other), so the combination is refused rather than left to the timeout.
        raise ValueError("mode='ssp' with policy='wait' needs num_servers=1 (with several servers use "
                         "policy='drop', or mode='sync' or 'async')")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if eval_every is not None and (bad_int(eval_every) or eval_every < 0):
        raise ValueError(f"eval_every must be an integer >= 0 or None, got {eval_every!r}")
    if not isinstance(train_dataloader, torch.utils.data.DataLoader):
        raise TypeError(f"train_dataloader must be a torch.utils.data.DataLoader, got "
                        f"{type(train_dataloader).__name__}")
    kill_after = dict(kill_after or {})
    for r in kill_after:
        if bad_int(r) or not 0 <= r < world_size:
            raise ValueError(f"kill_after names rank {r!r}; ranks are 0 .. {world_size - 1}")
    if isinstance(test_dataloader, torch.utils.data.DataLoader):
        try:
            empty = len(cast(Sized, test_dataloader.dataset)) == 0
        except TypeError:  # an iterable data set: no length to check
            empty = False
        if empty:
            raise ValueError("test_dataloader has no samples (its accuracy would read 0); pass None to skip the "
                             "evaluation")
    batch_size = train_dataloader.batch_size
    if batch_size is None:
        raise ValueError("train_dataloader must batch by batch_size (a batch_sampler is not supported)")

    torch.manual_seed(seed)
    if model is None:
        model = models.small_cnn()
    elif not isinstance(model, nn.Module):
        model = model()
    off_cpu = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != "cpu"})
    if off_cpu:
        raise ValueError(f"the model must be on the CPU (the ranks train on the CPU), found tensors on {off_cpu}")
    params = _trainable(model)
    if not params or len({p.dtype for p in params}) != 1 or not params[0].is_floating_point():
        raise ValueError("the model's trainable parameters (requires_grad=True) must exist and share one "
                         f"floating-point dtype, got {sorted({str(p.dtype) for p in params})}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    num_workers = world_size - num_servers
    if flat.numel() < num_servers:
        raise ValueError(f"{flat.numel()} parameters cannot be split over {num_servers} servers")
    dataset = train_dataloader.dataset
    shuffle = isinstance(train_dataloader.sampler, torch.utils.data.RandomSampler)
    drop_last = train_dataloader.drop_last
    steps = [epochs_per_worker * _batches(len(cast(Sized, dataset)), num_workers, k, batch_size, drop_last)
             for k in range(num_workers)]
    expected_updates = max(steps) if mode == "sync" else sum(steps)
    if eval_every is None:
        eval_every = max(1, expected_updates // 20)
    cfg = {"world_size": world_size, "num_servers": num_servers, "epochs": epochs_per_worker, "mode": mode,
           "staleness": staleness, "policy": policy, "timeout": float(timeout), "seed": seed,
           "log_interval": log_interval, "eval_every": eval_every, "kill_after": kill_after,
           "model": model, "flat": flat, "slices": _slices(flat.numel(), num_servers),
           "optimizer": optimizer or _default_optimizer, "loss_fn": loss_fn or nn.functional.cross_entropy,
           "data": (dataset, batch_size, train_dataloader.collate_fn, drop_last, shuffle)}
    payload = cloudpickle.dumps(cfg)

    start = time.perf_counter()
    done, errors, deaths = _run_processes(payload, world_size, float(timeout))
    wall = time.perf_counter() - start

    def role(r: int) -> str:
        return _role(r, num_servers, world_size)

    tolerated = {r: why for r, why in deaths.items()
                 if r >= num_servers and mode != "sync" and not errors
                 and all(r in done[s]["dead"] for s in range(num_servers) if s in done)}
    fatal_deaths = {r: why for r, why in deaths.items() if r not in tolerated}
    if errors or fatal_deaths or any(s not in done for s in range(num_servers)):
        lines = [f"{role(r)} {why}" for r, why in sorted(fatal_deaths.items())]
        lines += [f"{role(r)} raised: {text.strip()}" for r, text in sorted(errors.items())]
        raise ParameterServerError("parameter-server job failed:\n" + "\n".join(lines))
    for r, why in sorted(tolerated.items()):
        warnings.warn(f"parameter server: {role(r)} {why}; it was dropped and training went on without it",
                      RuntimeWarning, stacklevel=2)

    servers = [done[s] for s in range(num_servers)]
    final = torch.cat([torch.from_numpy(s["slice"]) for s in servers])
    result_model = _with_parameters(model, final)
    first_worker = done.get(num_servers)
    if first_worker and first_worker.get("buffers"):
        buffers = dict(result_model.named_buffers())
        for name, value in first_worker["buffers"].items():
            buffers[name].copy_(torch.from_numpy(value))
    history: list[tuple[float, int, float]] = []
    final_accuracy = None
    if test_dataloader is not None:
        probe = _with_parameters(model, final)
        for snaps in zip(*[s["snapshots"] for s in servers]):
            probe_flat = torch.cat([torch.from_numpy(v) for _, _, v in snaps])
            torch.nn.utils.vector_to_parameters(probe_flat.to(params[0].dtype), _trainable(probe))
            history.append((max(t for t, _, _ in snaps), snaps[0][1], evaluate(probe, test_dataloader)))
        final_accuracy = evaluate(result_model, test_dataloader)
    workers = {r: v for r, v in done.items() if r >= num_servers}
    worker_losses = {r: v["losses"] for r, v in workers.items()}
    losses = sorted((p for v in worker_losses.values() for p in v), key=lambda p: p[0])
    epoch_marks = [max((v["epoch_ends"][e] for v in workers.values() if len(v["epoch_ends"]) > e), default=0.0)
                   for e in range(epochs_per_worker)]
    epoch_times = [b - a for a, b in zip([0.0] + epoch_marks[:-1], epoch_marks)]
    elapsed = max(s["end"] for s in servers)
    log = [row for s in servers for row in s["log"]]
    applied = [st for (srv, _, st, ok) in log if ok]
    stats = ParameterServerStats(
        mode=mode, staleness=staleness if mode == "ssp" else None, policy=policy if mode == "ssp" else None,
        world_size=world_size, num_servers=num_servers, num_workers=num_workers, elapsed=elapsed, wall=wall,
        epoch_times=epoch_times, updates=servers[0]["updates"], gradients_applied=servers[0]["applied"],
        gradients_dropped=servers[0]["dropped"], updates_per_second=servers[0]["updates"] / max(elapsed, 1e-9),
        samples=sum(v["samples"] for v in workers.values()), losses=losses, worker_losses=worker_losses,
        accuracy_history=history, final_accuracy=final_accuracy, staleness_log=log,
        max_applied_staleness=max(applied, default=0), dead_workers=sorted(tolerated))
    if log_interval != -1:
        accuracy = "-" if final_accuracy is None else f"{final_accuracy:.4f}"
        print(f"[ps] {mode} with {num_servers} server(s) and {num_workers} worker(s) x {epochs_per_worker} "
              f"epoch(s): {elapsed:.2f} s training ({wall:.2f} s with start-up), {stats.updates} updates "
              f"({stats.updates_per_second:.1f}/s), test accuracy {accuracy}", flush=True)
    return result_model, stats


def _with_parameters(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    params = _trainable(out)
    torch.nn.utils.vector_to_parameters(flat.to(params[0].dtype), params)
    return out
