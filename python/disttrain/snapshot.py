"""Fault-tolerant snapshots of nested training state.

A snapshot is one self-describing file (see ``docs/snapshot.md``): a header,
JSON metadata, a tensor table and the raw tensor bytes, with a CRC-32C per
tensor and for the whole file. It is written to a temporary file, fsynced and
renamed, so a crash at any instant leaves the old snapshot or the new one.

Any nesting of dicts (also ``OrderedDict`` with its ``_metadata``), lists and
tuples holding tensors, numpy arrays, numbers, strings, bytes and ``None``
round-trips exactly: tensors go to the tensor table, everything else into the
JSON metadata, which refers to tensors by name. Tensors come back on the CPU.

Example:
    >>> from disttrain import snapshot
    >>> snapshot.save("run/step_000000100.dts", {"model": model.state_dict(), "step": 100})
    >>> state = snapshot.load("run/step_000000100.dts")
    >>> writer = snapshot.AsyncSnapshotter("run", keep=3)
    >>> writer.save({"model": model.state_dict()}, step=200)  # returns after a memory copy
    >>> path, state = snapshot.load_latest("run")               # newest snapshot that verifies
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import re
import time
from typing import Any

import numpy as np
import torch

from . import _C
from ._processes import pid_alive

__all__ = ["save", "load", "AsyncSnapshotter", "list_snapshots", "latest_good", "load_latest", "export",
           "CorruptSnapshotError", "SnapshotWriteError", "UnsupportedSnapshotError", "SUFFIX"]

log = logging.getLogger("disttrain.snapshot")

#: A snapshot that fails verification; ``.path`` and ``.tensor`` (or None) say where.
CorruptSnapshotError = _C.CorruptSnapshotError
#: Writing a snapshot failed (an ``OSError``: ``.errno``, ``.filename``). The previous one is intact,
#: unless ``.replaced_target``: the new file was renamed into place, but its directory's fsync failed.
SnapshotWriteError = _C.SnapshotWriteError
#: A snapshot of a format version this disttrain does not read (``.path``, ``.version``).
UnsupportedSnapshotError = _C.UnsupportedSnapshotError

SUFFIX = ".dts"
_FORMAT_TAG = "disttrain.snapshot/1"
_NAME_RE = re.compile(r"^(?P<stem>[^.].*?)(?P<step>\d+)\.dts$")
_TEMP_RE = re.compile(r"^\..+\.dts\.tmp\.(?P<pid>\d+)\.\d+$")


# --- nested state <-> (JSON tree, named tensors) ------------------------------------------------

class _Flattener:
    def __init__(self, stage_on_host: bool):
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self._by_id: dict[int, str] = {}
        self._taken: set[str] = set()
        self._originals: list[torch.Tensor] = []
        self._stage_on_host = stage_on_host

    def _add_tensor(self, tensor: torch.Tensor, path: str) -> str:
        # The same tensor object twice (tied weights) is stored once and comes back shared.
        if id(tensor) in self._by_id:
            return self._by_id[id(tensor)]
        name, n = path or "tensor", 1
        while name in self._taken:
            n += 1
            name = f"{path}#{n}"
        self._by_id[id(tensor)] = name
        self._originals.append(tensor)  # keeps id(tensor) from being reused by a later temporary
        self._taken.add(name)
        t = tensor.detach().resolve_conj().resolve_neg()
        if self._stage_on_host:
            t = t.cpu().contiguous()
        self.names.append(name)
        self.tensors.append(t)
        return name

    def encode(self, value: Any, path: str) -> Any:
        # Before the scalars: np.float64 is a float, but must come back as itself.
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)  # ascontiguousarray would make a 0-d array 1-d
            array = np.ascontiguousarray(array) if array.ndim else array
            raw = torch.from_numpy(array.reshape(-1).view(np.uint8).copy())
            return {"$ndarray": self._add_tensor(raw, path), "dtype": array.dtype.str, "shape": list(array.shape),
                    "scalar": isinstance(value, np.generic)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                raise TypeError(f"snapshot: tensor at '{path}' has layout {value.layout}; only dense tensors are supported")
            node: dict[str, Any] = {"$tensor": self._add_tensor(value, path)}
            if value.requires_grad:
                node["requires_grad"] = True
            return node
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if isinstance(value, dict):
            items = [[self.encode(k, f"{path}/<key>"), self.encode(v, _join(path, k))] for k, v in value.items()]
            if isinstance(value, collections.OrderedDict):
                node = {"$odict": items}
                meta = getattr(value, "_metadata", None)
                if meta is not None:
                    node["metadata"] = self.encode(meta, f"{path}/_metadata")
                return node
            if type(value) is collections.Counter:  # MultiStepLR's milestones
                return {"$counter": items}
            if type(value) is not dict:
                raise TypeError(f"snapshot: cannot store {type(value).__name__} at '{path}' (dict, OrderedDict and Counter only)")
            return {"$dict": items}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and type(value) is tuple:
            return {"$tuple": [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        raise TypeError(f"snapshot: cannot store a {type(value).__name__} at '{path}'; use tensors, numpy arrays, "
                        "numbers, strings, bytes, None, and dicts/lists/tuples of them")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if "$tensor" in node:
        t = tensors[node["$tensor"]]
        return t.requires_grad_() if node.get("requires_grad") else t
    if "$ndarray" in node:
        raw = tensors[node["$ndarray"]].numpy()
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:  # a view of raw bytes as Python object pointers
            raise ValueError(f"array dtype {dtype} holds Python objects")
        array = raw.view(dtype).reshape(node["shape"]).copy()
        return array[()] if node.get("scalar") else array
    if "$size" in node:
        return torch.Size(node["$size"])
    if "$dict" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["$dict"]}
    if "$odict" in node:
        out: Any = collections.OrderedDict((_decode(k, tensors), _decode(v, tensors)) for k, v in node["$odict"])
        if "metadata" in node:
            out._metadata = _decode(node["metadata"], tensors)
        return out
    if "$counter" in node:
        return collections.Counter({_decode(k, tensors): _decode(v, tensors) for k, v in node["$counter"]})
    if "$tuple" in node:
        return tuple(_decode(v, tensors) for v in node["$tuple"])
    if "$bytes" in node:
        return base64.b64decode(node["$bytes"])
    if "$dtype" in node:
        dtype = getattr(torch, node["$dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"'{node['$dtype']}' is not a torch dtype")
        return dtype
    raise ValueError(f"snapshot: unknown node {sorted(node)} in the metadata")


def _flatten(state: Any, stage_on_host: bool) -> tuple[bytes, list[str], list[torch.Tensor]]:
    f = _Flattener(stage_on_host)
    tree = f.encode(state, "")
    metadata = json.dumps({"format": _FORMAT_TAG, "state": tree}, separators=(",", ":")).encode()
    return metadata, f.names, f.tensors


def _unflatten(path: str, metadata: bytes, names: list[str], tensors: list[torch.Tensor]) -> Any:
    # Metadata that passed its CRC can still be hostile or from a buggy writer
    # (found by fuzz/python/snapshot_load_fuzzer.py): whatever does not decode
    # is a corrupt snapshot, never a stray JSONDecodeError or KeyError.
    try:
        doc = json.loads(metadata)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT_TAG:
            raise CorruptSnapshotError(f"snapshot '{path}' has metadata this version of disttrain does not understand")
        return _decode(doc["state"], dict(zip(names, tensors)))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        if isinstance(e, CorruptSnapshotError):
            raise
        raise CorruptSnapshotError(f"snapshot '{path}' has malformed metadata ({type(e).__name__}: {e})") from None


def _fault_options() -> dict[str, Any]:
    """Test hook: ``DISTTRAIN_SNAPSHOT_FAULT=enospc:BYTES`` makes writes fail
    with ENOSPC after BYTES bytes; ``kill:BYTES`` SIGKILLs the process there;
    ``dirfsync`` fails the directory's fsync after the rename (EIO)."""
    spec = os.environ.get("DISTTRAIN_SNAPSHOT_FAULT", "")
    if not spec:
        return {}
    if spec == "dirfsync":
        return {"fail_directory_fsync": True}
    kind, _, nbytes = spec.partition(":")
    key = {"enospc": "fail_after_bytes", "kill": "kill_after_bytes"}.get(kind)
    if key is None or not nbytes.isdigit():
        raise ValueError(f"DISTTRAIN_SNAPSHOT_FAULT='{spec}': expected enospc:BYTES, kill:BYTES or dirfsync")
    return {key: int(nbytes)}


# --- public API ---------------------------------------------------------------------------------

def save(path: str | os.PathLike, state: Any, *, fsync: bool = True) -> int:
    """Writes ``state`` to ``path`` atomically and durably.

    Args:
        path: the snapshot file (by convention ``*.dts``); its directory must exist.
        state: nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings, bytes, None.
        fsync: make the file durable before returning (default). Only turn off
            where a crash of the machine does not matter.

    Returns:
        The file size in bytes.

    Raises:
        SnapshotWriteError: the disk is full, the directory is not writable, ...;
            whatever was at ``path`` before is untouched. Except when the
            error's ``replaced_target`` is true: the new file is complete and
            in place, but the fsync of its directory failed (the rename may
            not survive a crash of the machine).

    Example:
        >>> snapshot.save("model.dts", {"model": model.state_dict(), "epoch": 3})
    """
    metadata, names, tensors = _flatten(state, stage_on_host=True)
    return _C.snapshot_write(os.fspath(path), metadata, names, tensors, fsync, **_fault_options())


def load(path: str | os.PathLike) -> Any:
    """Reads a snapshot, verifying every checksum.

    Raises:
        CorruptSnapshotError: truncated or damaged file; the message (and the
            ``path`` and ``tensor`` attributes) say which file and which tensor.
        UnsupportedSnapshotError: a format version this disttrain does not read.
        FileNotFoundError: no such file.
        OSError: the system failed to read it (``errno``: EIO, EISDIR, EACCES, ...).

    Example:
        >>> state = snapshot.load("model.dts")
        >>> model.load_state_dict(state["model"])
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"snapshot '{path}' does not exist")
    metadata, names, tensors = _C.snapshot_read(path)
    return _unflatten(path, metadata, names, tensors)


def list_snapshots(directory: str | os.PathLike) -> list[str]:
    """Paths of the snapshots ``<name><number>.dts`` in ``directory``, oldest first (by number)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME_RE.match(name)
        if m:
            found.append((int(m.group("step")), name))
    return [os.path.join(directory, name) for _, name in sorted(found)]


def load_latest(directory: str | os.PathLike) -> tuple[str | None, Any]:
    """Loads the newest snapshot in ``directory`` that verifies.

    A newest snapshot that cannot be loaded (corrupt or truncated, vanished,
    unreadable: any ``OSError`` such as EIO, or of an unsupported format
    version) is logged (file, tensor, reason) and the one before it is tried,
    and so on.

    Returns:
        ``(path, state)``, or ``(None, None)`` when there is no good snapshot.

    Example:
        >>> path, state = snapshot.load_latest("runs/exp1/snapshots")
    """
    candidates = list(reversed(list_snapshots(directory)))
    for i, path in enumerate(candidates):
        fallback = f"falling back to '{os.path.basename(candidates[i + 1])}'" if i + 1 < len(candidates) \
            else "no older snapshot left"
        try:
            return path, load(path)
        except (CorruptSnapshotError, UnsupportedSnapshotError) as e:
            log.warning("%s; %s", e, fallback)
        except FileNotFoundError:
            log.warning("snapshot '%s' vanished while loading; %s", path, fallback)
        except OSError as e:  # EIO, EISDIR, EACCES, ...: this file cannot be read now, an older one may
            log.warning("snapshot '%s' cannot be read (%s); %s", path, e, fallback)
    return None, None


def latest_good(directory: str | os.PathLike) -> str | None:
    """Path of the newest snapshot in ``directory`` that verifies, or None.

    Reads (and checks) whole files; use :func:`load_latest` to keep the state
    of the one found instead of reading it twice.
    """
    return load_latest(directory)[0]


def export(path: str | os.PathLike, out_path: str | os.PathLike, key: str | None = None) -> Any:
    """Converts a snapshot to a plain ``torch.save`` file.

    Args:
        path: the snapshot.
        out_path: the ``.pt`` file to write.
        key: keep only ``state[key]`` (e.g. ``"model"`` for a state dict that
            ``torch.load`` + ``load_state_dict`` use directly).

    Returns:
        The object written.

    Example:
        >>> snapshot.export("runs/exp1/best_model.dts", "model.pt", key="model")
        >>> model.load_state_dict(torch.load("model.pt"))
    """
    state = load(path)
    if key is not None:
        state = state[key]
    torch.save(state, os.fspath(out_path))
    return state


class AsyncSnapshotter:
    """Saves snapshots in a background thread, keeping the last ``keep``.

    :meth:`save` copies the tensors into host staging memory and returns; a C++
    thread (no GIL) writes the file. The next :meth:`save` waits only if the
    previous write is still running. An error of a background write (full
    disk, ...) is raised by the next :meth:`save` or :meth:`wait`; the
    snapshots written before stay intact.

    Args:
        directory: where snapshots ``<prefix><step>.dts`` go; created if missing.
        keep: how many snapshots ``<prefix><step>.dts`` to keep: once a new one
            is committed, the oldest of those on disk are deleted so that
            ``keep`` remain (a write that failed, or is still in flight, is
            never counted); ``None`` keeps all. Files of another prefix in the
            same directory are never deleted.
        prefix: file name prefix.
        fsync: make each file durable (default).

    Example:
        >>> snapshotter = AsyncSnapshotter("runs/exp1/snapshots", keep=3)
        >>> for step in range(steps):
        ...     train_step()
        ...     if step % 100 == 0:
        ...         snapshotter.save({"model": model.state_dict(), "step": step}, step=step)
        >>> snapshotter.wait()
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, prefix: str = "step_",
                 fsync: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"AsyncSnapshotter: keep must be at least 1 (or None), got {keep}")
        self.directory = os.fspath(directory)
        self.keep = keep
        self.prefix = prefix
        self.fsync = fsync
        self.last_blocked_seconds = 0.0
        os.makedirs(self.directory, exist_ok=True)
        self._remove_stale_temp_files()
        self._writer = _C.AsyncSnapshotWriter()
        self._in_flight: str | None = None
        self._own_name = re.compile(re.escape(self.prefix) + r"(?P<step>\d+)" + re.escape(SUFFIX) + "$")

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}{step:09d}{SUFFIX}")

    def save(self, state: Any, step: int | None = None, path: str | os.PathLike | None = None, *,
             copy_in_background: bool = False) -> str:
        """Starts writing ``state`` as snapshot ``step`` (or to ``path``, outside the keep-last-K set).

        Args:
            state: as for :func:`save`.
            step: the snapshot's number (file ``<prefix><step>.dts``).
            path: or an explicit file, not counted in ``keep``.
            copy_in_background: also copy the tensors in the background thread
                and return at once. The tensors in ``state`` must then not change
                until :meth:`wait_staged` returns: a training loop calls it just
                before ``optimizer.step()``, so the copy overlaps forward and
                backward (tensors that forward changes, such as batch-norm
                statistics, must be cloned into ``state``).

        Returns:
            The path being written; it appears (atomically) when the write completes.

        Raises:
            SnapshotWriteError: the previous background write failed.
        """
        if (step is None) == (path is None):
            raise ValueError("AsyncSnapshotter.save: give exactly one of step and path")
        start = time.perf_counter()
        if step is not None:
            target = self.path_for(step)
        else:
            assert path is not None  # exactly one of step and path, checked above
            target = os.fspath(path)
        # The previous write first (the writer would wait for it anyway): only
        # then is the directory what the keep-last-K rule counts, with that
        # write committed, or failed (raised here) and not on disk.
        self.wait()
        remove: list[str] = []
        if step is not None and self.keep is not None:
            older = self._own_snapshots(exclude=target)
            # After this one commits, ``keep`` remain: it and the newest keep - 1 before it.
            remove = older[:max(0, len(older) - (self.keep - 1))]
        metadata, names, tensors = _flatten(state, stage_on_host=False)
        self._writer.save(target, metadata, names, tensors, remove, self.fsync, copy_in_background=copy_in_background,
                          **_fault_options())
        self._in_flight = target
        self.last_blocked_seconds = time.perf_counter() - start
        return target

    def _own_snapshots(self, exclude: str) -> list[str]:
        """This writer's committed snapshots ``<prefix><step>.dts``, oldest first (by step)."""
        found = []
        for name in os.listdir(self.directory):
            m = self._own_name.match(name)
            path = os.path.join(self.directory, name)
            if m and path != exclude:
                found.append((int(m.group("step")), path))
        return [path for _, path in sorted(found)]

    def wait(self) -> str | None:
        """Blocks until the write in flight is committed; returns its path (None if there was none).

        Raises:
            SnapshotWriteError: that write failed.
        """
        done, self._in_flight = self._in_flight, None
        self._writer.wait()
        return done

    def wait_staged(self) -> None:
        """Blocks until the tensors of the last :meth:`save` are copied (only
        ever waits after ``save(..., copy_in_background=True)``)."""
        self._writer.wait_staged()

    @property
    def busy(self) -> bool:
        """True while a background write is running."""
        return self._writer.busy

    @property
    def last_write_seconds(self) -> float:
        """Duration of the last completed background write."""
        return self._writer.last_write_seconds

    def close(self) -> None:
        """Waits for the write in flight (raising its error)."""
        self.wait()

    def __enter__(self) -> "AsyncSnapshotter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            try:
                self.close()
            except OSError as e:
                log.error("snapshot write failed while handling another error: %s", e)

    def _remove_stale_temp_files(self) -> None:
        # Left by a process killed mid-write; a live writer's files are kept.
        for name in os.listdir(self.directory):
            m = _TEMP_RE.match(name)
            if m and not pid_alive(int(m.group("pid"))):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
