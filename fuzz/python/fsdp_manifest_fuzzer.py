"""atheris target: the FSDP sharded-checkpoint loader (``disttrain.fsdp.read_sharded_checkpoint``
and its ``_read_manifest``) on hostile manifests.

The checkpoint is fuzz/seeds/fsdp_checkpoint (a real one: two linear layers and
a batch norm, one rank). The input becomes its manifest as snapshot_input.py
says (raw, or JSON metadata with the real manifest's tensors behind valid
checksums, which reaches the manifest's structure). The loader must return or raise
ValueError (CorruptSnapshotError is one), FileNotFoundError or
UnsupportedSnapshotError."""

from __future__ import annotations

import os
import shutil
import tempfile

import snapshot_input
from disttrain import _C, fsdp, snapshot

_SEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seeds", "fsdp_checkpoint")
_DIR = os.path.join(tempfile.mkdtemp(prefix="disttrain-fuzz-"), "ckpt")
shutil.copytree(_SEED, _DIR)
_MANIFEST = os.path.join(_DIR, fsdp.MANIFEST)
_, _NAMES, _TENSORS = _C.snapshot_read(os.path.join(_SEED, fsdp.MANIFEST))


def test_one_input(data: bytes) -> None:
    if not snapshot_input.write(_MANIFEST, data, _NAMES, _TENSORS):
        return
    try:
        fsdp.read_sharded_checkpoint(_DIR)
    except (ValueError, FileNotFoundError, snapshot.UnsupportedSnapshotError):
        pass

