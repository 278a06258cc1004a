"""Lightning checkpoints in disttrain's snapshot format.

A Lightning checkpoint is a dict of tensors (model and optimizer state) and
small Python objects (loop progress, callback state, hyper-parameters). The
tensors and plain values go into the snapshot as they are; anything the
snapshot format cannot hold (an ``AttributeDict`` of hyper-parameters, a Hydra
``DictConfig``, a callback's custom object) is pickled into a bytes entry, so
the file keeps its checksums and its atomic commit. Loading such an entry
unpickles it, as ``torch.load(weights_only=False)`` would: load only
checkpoints you trust (``weights_only=True`` refuses them).
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from .. import snapshot

_PICKLED = "$disttrain.pickled"
_MAGIC = b"\x89DTSNAP\n"


def plain(value: Any) -> Any:
    """``value`` with everything the snapshot format cannot store pickled."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype,
                                           np.ndarray, np.generic)):
        return value
    if type(value) in (dict, collections.OrderedDict) and all(
            k is None or isinstance(k, (bool, int, float, str)) for k in value):
        out = type(value)((k, plain(v)) for k, v in value.items())
        if type(value) is collections.OrderedDict and getattr(value, "_metadata", None) is not None:
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    return {_PICKLED: pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)}


def restore(value: Any, allow_pickle: bool, where: str) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _PICKLED in value:
            if not allow_pickle:
                raise pickle.UnpicklingError(
                    f"checkpoint '{where}' holds a pickled Python object; weights_only=True refuses it "
                    "(load with weights_only=False if you trust the file)")
            return pickle.loads(value[_PICKLED])
        out = type(value)((k, restore(v, allow_pickle, where)) for k, v in value.items())
        if getattr(value, "_metadata", None) is not None:
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, list):
        return [restore(v, allow_pickle, where) for v in value]
    if isinstance(value, tuple):
        return tuple(restore(v, allow_pickle, where) for v in value)
    return value


def is_snapshot(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file in disttrain's snapshot format."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_MAGIC)) == _MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


def _map(value: Any, map_location: Any) -> Any:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return value  # snapshot tensors come back on the CPU; device maps need torch.load semantics
    if isinstance(value, torch.Tensor):
        return value.to(map_location)
    if isinstance(value, dict):
        out = type(value)((k, _map(v, map_location)) for k, v in value.items())
        if getattr(value, "_metadata", None) is not None:
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, map_location) for v in value)
    return value


def load_checkpoint(path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
    """Any checkpoint the disttrain strategies write (a snapshot file, a sharded
    checkpoint's folder, consolidated) or Lightning's own ``torch.save`` format.
    ``import disttrain.lightning`` makes ``LightningModule.load_from_checkpoint``
    read them through this."""
    from lightning.fabric.utilities.cloud_io import _load

    if isinstance(path, (str, os.PathLike)):
        where = os.fspath(path)
        if is_snapshot(where):
            return _map(restore(snapshot.load(where), weights_only is not True, where), map_location)
        from ..fsdp import MANIFEST, read_sharded_checkpoint

        if os.path.isdir(where) and os.path.isfile(os.path.join(where, MANIFEST)):
            state_dict, extra = read_sharded_checkpoint(where)
            checkpoint = restore(extra or {}, weights_only is not True, where)
            return _map({**checkpoint, "state_dict": state_dict}, map_location)
    return _load(path, map_location=map_location, weights_only=weights_only)


def _patch_load_from_checkpoint() -> None:
    """``LightningModule.load_from_checkpoint`` (and the DataModule's) read the file
    with ``torch.load``, which fails on a snapshot with an unpickling error
    ("Unsupported operand 68"): route them through :func:`load_checkpoint`."""
    from lightning.pytorch.core import saving

    if getattr(saving.pl_load, "_disttrain", False):
        return

    def pl_load(path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    pl_load._disttrain = True  # type: ignore[attr-defined]
    saving.pl_load = pl_load  # type: ignore[assignment]


class SnapshotCheckpointIO(CheckpointIO):
    """Saves Lightning (Trainer or Fabric) checkpoints as disttrain snapshots:
    one file, a CRC-32C per tensor and for the file, written to a temporary
    file, fsynced and renamed (a crash leaves the old checkpoint or the new).

    With ``async_write`` (default) :meth:`save_checkpoint` returns once the
    tensors are copied to host memory; a C++ thread writes the file while
    training goes on. The next save, a load, a removal and teardown wait for
    it, and a failed write is raised there.

    Loading accepts these files and, for a smooth switch, checkpoints written
    by Lightning's own ``torch.save`` format.

    Args:
        async_write: write in the background (default True).
        fsync: make every file durable before it counts as written (default True).

    Example:
        >>> trainer = Trainer(strategy="disttrain_ddp", plugins=[SnapshotCheckpointIO(async_write=False)])
    """

    def __init__(self, async_write: bool = True, fsync: bool = True):
        self.async_write = async_write
        self.fsync = fsync
        self._writer: snapshot.AsyncSnapshotter | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SnapshotCheckpointIO.save_checkpoint: storage_options is not supported")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(f"SnapshotCheckpointIO: checkpoint path '{path}' is a directory")
        state = plain(checkpoint)
        if not self.async_write:
            snapshot.save(path, state, fsync=self.fsync)
            return
        if self._writer is None:
            self._writer = snapshot.AsyncSnapshotter(directory, keep=None, fsync=self.fsync)
        self._writer.save(state, path=path)  # waits for the previous write; raises its error

    def wait(self) -> None:
        """Blocks until the background write (if any) is on disk; raises its error."""
        if self._writer is not None:
            self._writer.wait()

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        self.wait()
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint '{path}' does not exist")
        if is_snapshot(path):
            return _map(restore(snapshot.load(path), weights_only is not True, path), map_location)
        from lightning.fabric.utilities.cloud_io import _load
        return _load(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        path = os.fspath(path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def teardown(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.wait()
            finally:
                writer.close()
