"""atheris target: ``disttrain.snapshot.load`` on arbitrary bytes.

The input becomes a file as snapshot_input.py says (raw, or JSON metadata with
the tensors of ``STATE`` behind valid checksums, which reaches the Python
decoding of the metadata). ``load`` must return or raise CorruptSnapshotError /
UnsupportedSnapshotError."""

from __future__ import annotations

import os
import tempfile

import torch

import snapshot_input
from disttrain import snapshot

_DIR = tempfile.mkdtemp(prefix="disttrain-fuzz-")
_PATH = os.path.join(_DIR, "input.dts")
STATE = {"model": {"weight": torch.ones(2, 3), "steps": torch.arange(4)}, "epoch": 3, "tags": [1, 2.5, None],
         "raw": (b"x", True), "half": torch.zeros(2, dtype=torch.bfloat16)}
_, _NAMES, _TENSORS = snapshot._flatten(STATE, stage_on_host=False)


def test_one_input(data: bytes) -> None:
    if not snapshot_input.write(_PATH, data, _NAMES, _TENSORS):
        return
    try:
        snapshot.load(_PATH)
    except (snapshot.CorruptSnapshotError, snapshot.UnsupportedSnapshotError):
        pass

