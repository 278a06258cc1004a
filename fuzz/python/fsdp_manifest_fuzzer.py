"""atheris target: the FSDP sharded-checkpoint loader (``disttrain.fsdp.read_sharded_checkpoint``
and its ``_read_manifest``) on hostile manifests.

The checkpoint is fuzz/seeds/fsdp_checkpoint (a real one: two linear layers and
a batch norm, one rank). Byte 0 is a mode. Even: the rest replaces the manifest
file as is. Odd: the rest is the manifest's JSON metadata, written with the
real manifest's tensors as a well-formed snapshot (valid checksums), so
mutations reach the manifest's structure. The loader must return or raise
ValueError (CorruptSnapshotError is one), FileNotFoundError or
UnsupportedSnapshotError."""

from __future__ import annotations

import os
import shutil
import tempfile

from disttrain import _C, fsdp, snapshot

_SEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seeds", "fsdp_checkpoint")
_DIR = os.path.join(tempfile.mkdtemp(prefix="disttrain-fuzz-"), "ckpt")
shutil.copytree(_SEED, _DIR)
_MANIFEST = os.path.join(_DIR, fsdp.MANIFEST)
_, _NAMES, _TENSORS = _C.snapshot_read(os.path.join(_SEED, fsdp.MANIFEST))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        with open(_MANIFEST, "wb") as f:
            f.write(data[1:])
    else:
        _C.snapshot_write(_MANIFEST, data[1:], _NAMES, _TENSORS, False)
    try:
        fsdp.read_sharded_checkpoint(_DIR)
    except (ValueError, FileNotFoundError, snapshot.UnsupportedSnapshotError):
        pass

