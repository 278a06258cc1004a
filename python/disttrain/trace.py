"""Timeline of a run as a Chrome trace (JSON that Perfetto, ui.perfetto.dev,
and chrome://tracing open), one process per rank, merged across ranks.

What is recorded (``csrc/trace/timeline.h``, off unless asked for):

- DDP (``disttrain.DistributedDataParallel``), per backward: ``backward`` (from
  backward reaching the module's outputs to autograd finishing), per bucket
  ``ready`` (its last gradient arrived) and ``bucket N`` in flight (its
  collective launched to completed, on the rank's ``buckets`` track, with the
  collective's sequence number), ``wait`` (the end of backward blocked on a
  bucket) and ``finalize`` (waiting and writing the gradients back);
- the ``disttrain`` backend: each op's run (``allreduce_coalesced``, ... with
  its sequence number and bytes) on the thread that ran it (the progress
  thread, or the caller's for a small synchronous all-reduce), the progress
  thread's ``idle`` spans (waiting for work), and shared-memory waits for a
  peer that outlasted the spinning (``wait data``, ``wait reduced data``,
  ``wait slot reuse``, with the peer's rank);
- spans the caller adds with :func:`span` (the DDP benchmark marks
  ``forward``, ``backward`` and ``optimizer``).

Two ways to turn it on:

    DISTTRAIN_TRACE=trace.json torchrun ... train.py   # from the first DDP construction to exit
    with disttrain.trace.record("trace.json"):           # every rank enters it
        ...

Each rank writes its part next to ``path``; rank 0 merges them into ``path``.
A rank removes its own part left by an earlier run (one that died before the
merge) when it starts recording, so rank 0 never merges a stale part.
Times are the steady clock of the host (one clock for all its processes);
parts from several hosts are merged as they are, not aligned.

``python -m disttrain.trace plot trace.json step.png`` draws one step (a
picture without a browser; needs matplotlib).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import json
import os
import sys
import threading
import time
import warnings
from typing import Any, Iterator

from . import _C

ENV = "DISTTRAIN_TRACE"

# Chrome trace events: dicts with name, cat, ph, ts (microseconds), pid, tid, ...
TraceEvent = dict[str, Any]


def enabled() -> bool:
    """Whether the timeline is recording."""
    return bool(_C.trace_enabled())


def start() -> None:
    """Starts recording (what an earlier recording left is dropped)."""
    _C.trace_start()


def stop() -> None:
    """Stops recording; :func:`collect` still returns what was recorded."""
    _C.trace_stop()


@contextlib.contextmanager
def span(name: str, category: str = "python") -> Iterator[None]:
    """Records ``name`` as a span on the calling thread while recording (else costs nothing)."""
    if not _C.trace_enabled():
        yield
        return
    begin = time.monotonic_ns()
    try:
        yield
    finally:
        _C.trace_span(category, name, begin, time.monotonic_ns())


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    """The job's size: the process group's (a group set up with explicit ``world_size`` and no
    ``WORLD_SIZE`` variable counts), else ``WORLD_SIZE``, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_writable(path: str, origin: str) -> None:
    """Creates ``path``'s folder and checks it can hold the file, before anything is recorded:
    a trace that cannot be written fails at once, not after the training it was to show."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        above = folder
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise NotADirectoryError(f"'{above}' is a file, not a folder")
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError("it is a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"folder '{folder}' is not writable")
    except OSError as e:
        reason = f"{e.strerror} ('{e.filename}')" if e.strerror and e.filename else str(e)
        raise OSError(f"disttrain.trace: cannot write the trace {origin}'{path}': {reason}") from None


def collect(rank: int | None = None) -> list[TraceEvent]:
    """What was recorded since the last collect, as Chrome trace events of process ``rank``
    (this rank by default); times in microseconds of the host's steady clock."""
    pid = _rank() if rank is None else rank
    names = dict(_C.trace_thread_names())
    main_thread = threading.main_thread().native_id
    if main_thread is not None:
        names.setdefault(main_thread, "main (forward, backward, optimizer)")
    out: list[TraceEvent] = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"rank {pid}"}},
                             {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}]
    seen_threads = set()
    for name, cat, ph, start_ns, end_ns, tid, ident, nbytes in _C.trace_drain():
        args: dict[str, Any] = {}
        if ident >= 0:
            args["peer" if cat == "comm.wait" else "seq" if cat in ("comm", "ddp.bucket") else "bucket"] = ident
        if nbytes >= 0:
            args["bytes"] = nbytes
        ts = start_ns / 1000.0
        if cat == "ddp.bucket":
            # Buckets overlap one another: async spans, drawn on the rank's "buckets" track.
            common = {"name": name, "cat": cat, "pid": pid, "tid": tid, "id": f"{pid}:{name}:{start_ns}"}
            out.append({**common, "ph": "b", "ts": ts, "args": args})
            out.append({**common, "ph": "e", "ts": end_ns / 1000.0})
            continue
        if cat == "comm.wait":
            name = f"wait {name}"
        elif cat == "comm" and name.isupper():  # c10d's op names: ALLREDUCE_COALESCED
            name = name.lower()
        seen_threads.add(tid)
        event: TraceEvent = {"name": name, "cat": cat, "ph": ph, "ts": ts, "pid": pid, "tid": tid, "args": args}
        if ph == "X":
            event["dur"] = (end_ns - start_ns) / 1000.0
        else:
            event["s"] = "t"
        out.append(event)
    for tid in sorted(seen_threads):
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                    "args": {"name": names.get(tid, f"thread {tid}")}})
    return out


def _part_path(path: str, rank: int) -> str:
    return f"{path}.rank{rank}.part"


def _remove_own_old_part(path: str, rank: int) -> None:
    """Removes a part this rank left at ``path`` in an earlier run that died before rank 0 merged
    it: rank 0 would take it for this run's (merge it, remove it) and this run's part would be left."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(_part_path(path, rank))


def write(path: str, events: list[TraceEvent], world_size: int = 1, rank: int = 0, timeout_s: float = 60.0) -> None:
    """Writes this rank's ``events``; rank 0 waits (up to ``timeout_s``) for the
    other ranks' parts and merges them all into ``path``. With one rank, writes ``path``."""
    if world_size <= 1:
        _dump(path, events)
        return
    part = _part_path(path, rank)
    _dump(part + ".tmp", events)
    os.replace(part + ".tmp", part)
    if rank != 0:
        return
    deadline = time.monotonic() + timeout_s
    parts = [_part_path(path, r) for r in range(world_size)]
    while not all(os.path.exists(p) for p in parts) and time.monotonic() < deadline:
        time.sleep(0.05)
    merged: list[TraceEvent] = []
    missing = []
    for r, p in enumerate(parts):
        if os.path.exists(p):
            with open(p) as f:
                merged += json.load(f)["traceEvents"]
            os.remove(p)
        else:
            missing.append(r)
    if missing:
        warnings.warn(f"disttrain.trace: no part from rank(s) {missing} after {timeout_s:g} s; '{path}' holds "
                      f"the other ranks only", RuntimeWarning, stacklevel=2)
    _dump(path, merged)


def _dump(path: str, events: list[TraceEvent]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


@contextlib.contextmanager
def record(path: str) -> Iterator[None]:
    """Records the block's timeline into ``path`` (Chrome trace JSON). Every
    rank enters the block; rank 0 writes the merged file when all have left it."""
    import torch.distributed as dist

    _check_writable(path, "")
    _remove_own_old_part(path, _rank())
    start()
    try:
        yield
    except BaseException:
        # The block's error is the one to see: a failed write only warns.
        stop()
        try:
            _write_block(path, dist)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"disttrain.trace: the trace '{path}' was not written: {e}", RuntimeWarning, stacklevel=3)
        raise
    stop()
    _write_block(path, dist)


def _write_block(path: str, dist: Any) -> None:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    write(path, collect(), world, _rank())


_from_env_started = False


def start_from_environment() -> None:
    """With ``DISTTRAIN_TRACE=path`` set, starts recording (once per process)
    and writes ``path`` at exit (each rank its part, rank 0 the merge)."""
    global _from_env_started
    path = os.environ.get(ENV)
    if not path or _from_env_started:
        return
    _check_writable(path, f"{ENV}=")
    _from_env_started = True
    rank, world = _rank(), _world_size()
    _remove_own_old_part(path, rank)
    start()

    def finish() -> None:
        stop()
        write(path, collect(rank), world, rank)

    atexit.register(finish)


# --- reading a trace -------------------------------------------------------

def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _overlap(spans: list[tuple[float, float]], within: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e, we) - max(s, ws)) for s, e in spans for ws, we in within)


def bucket_spans(events: list[TraceEvent], pid: int | None = None) -> list[tuple[float, float]]:
    """[launch, completion] of every DDP bucket (of process ``pid``, or all), in microseconds."""
    begins = {e["id"]: e["ts"] for e in events if e.get("cat") == "ddp.bucket" and e["ph"] == "b"
              and (pid is None or e["pid"] == pid)}
    return [(begins[e["id"]], e["ts"]) for e in events
            if e.get("cat") == "ddp.bucket" and e["ph"] == "e" and e["id"] in begins]


def spans_named(events: list[TraceEvent], name: str, pid: int | None = None) -> list[tuple[float, float]]:
    """[start, end] of the complete events called ``name`` (of process ``pid``, or all)."""
    return [(e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("ph") == "X" and e["name"] == name and (pid is None or e["pid"] == pid)]


def hidden(events: list[TraceEvent], pid: int | None = None) -> tuple[float, float]:
    """(communication time, part of it hidden behind backward) in microseconds:
    communication is the union of the buckets' [launch, completion] spans, and
    the hidden part is what falls inside DDP's ``backward`` spans."""
    comm = _union(bucket_spans(events, pid))
    total = sum(e - s for s, e in comm)
    return total, _overlap(comm, _union(spans_named(events, "backward", pid)))


# --- drawing a trace -------------------------------------------------------

_COLOURS = {"forward": "#9ecae1", "backward": "#3182bd", "loss.backward()": "#3182bd", "optimizer": "#31a354",
            "optimizer.step()": "#31a354", "finalize": "#fd8d3c",
            "wait": "#e6550d", "idle": "#dddddd", "bucket": "#756bb1", "comm": "#de2d26", "comm.wait": "#fcbba1",
            "ready": "#000000"}


def _colour(event: TraceEvent) -> str:
    if event.get("cat") == "ddp.bucket":
        return _COLOURS["bucket"]
    if event.get("cat") in ("comm", "comm.wait") and event["name"] not in ("idle",):
        return _COLOURS[event["cat"]]
    return _COLOURS.get(event["name"], "#969696")


def plot(events: list[TraceEvent], out: str, title: str = "", window: tuple[float, float] | None = None) -> None:
    """Draws ``events`` (within ``window``, microseconds) as one row per rank and
    thread, plus each rank's buckets in flight, to the image ``out`` (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = window if window else (min(e["ts"] for e in events if "ts" in e),
                                    max(e["ts"] + e.get("dur", 0) for e in events if "ts" in e))
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    rows: dict[tuple[int, Any], str] = {}
    bars: list[tuple[tuple[int, Any], float, float, TraceEvent]] = []
    begins = {}
    for e in events:
        if e.get("ph") == "b":
            begins[e["id"]] = e
        if e.get("ph") not in ("X", "e", "i"):
            continue
        if e["ph"] == "e":
            b = begins.get(e["id"])
            if not b:
                continue
            s, end, key = b["ts"], e["ts"], (e["pid"], "buckets")
            rows.setdefault(key, f"rank {e['pid']}: buckets in flight")
            bars.append((key, s, end, b))
            continue
        s, end = e["ts"], e["ts"] + e.get("dur", 0)
        if end < lo or s > hi:
            continue
        key = (e["pid"], e["tid"])
        rows.setdefault(key, f"rank {e['pid']}: {thread_names.get(key, e['tid'])}")
        bars.append((key, s, end, e))
    order = sorted(rows, key=lambda k: (k[0], k[1] == "buckets", "progress" not in rows[k], str(k[1])))
    y = {k: i for i, k in enumerate(reversed(order))}
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(order) + 1.4))
    to_ms = lambda t: (t - lo) / 1000.0  # noqa: E731
    for key, s, end, e in bars:
        if end < lo or s > hi:
            continue
        s, end = max(s, lo), min(end, hi)
        if e.get("ph") == "i":
            ax.plot([to_ms(s)], [y[key]], marker="|", color="black", markersize=14)
            continue
        nested = e.get("cat") == "python"  # forward/backward/optimizer under DDP's own spans: thinner, behind
        height = 0.8 if not nested else 0.35
        offset = 0 if not nested else 0.3
        edged = e.get("cat") == "ddp.bucket" or (e.get("cat") == "comm" and e["name"] != "idle")
        ax.broken_barh([(to_ms(s), to_ms(end) - to_ms(s))], (y[key] - height / 2 + offset, height),
                       facecolors=_colour(e), edgecolor="black" if edged else "none", linewidth=0.4)
    ax.set_yticks(list(y.values()))
    ax.set_yticklabels([rows[k] for k in y])
    ax.set_xlim(0, (hi - lo) / 1000.0)
    ax.set_xlabel("ms")
    if title:
        ax.set_title(title)
    from matplotlib.patches import Patch

    legend = [("forward", "forward"), ("backward", "backward (DDP's span; thin: the caller's)"),
              ("optimizer", "optimizer"), ("finalize", "finalize"), ("wait", "blocked on a bucket"),
              ("bucket", "bucket in flight"), ("comm", "reduction running"), ("comm.wait", "waiting for a peer"),
              ("idle", "progress thread idle")]
    ax.legend(handles=[Patch(color=_COLOURS[k], label=v) for k, v in legend], loc="upper center",
              bbox_to_anchor=(0.5, -0.5 / max(1, len(order)) - 0.12), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disttrain.trace", description="Draw a disttrain trace.")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plot", help="draw a trace (or a window of it) to an image")
    pl.add_argument("trace")
    pl.add_argument("out")
    pl.add_argument("--title", default="")
    args = p.parse_args(argv)
    with open(args.trace) as f:
        events = json.load(f)["traceEvents"]
    plot(events, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
