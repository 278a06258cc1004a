"""atheris target: ``disttrain.snapshot.load`` on arbitrary bytes.

Byte 0 is a mode. Even: the rest is the file as is. Odd: the rest is the
JSON metadata, written with the tensors of ``STATE`` as a well-formed snapshot
(valid checksums) by the C++ writer, so mutations reach the Python decoding of
the metadata behind the checksums. ``load`` must
return or raise CorruptSnapshotError / UnsupportedSnapshotError."""

from __future__ import annotations

import os
import tempfile

import torch

from disttrain import _C, snapshot

_DIR = tempfile.mkdtemp(prefix="disttrain-fuzz-")
_PATH = os.path.join(_DIR, "input.dts")
STATE = {"model": {"weight": torch.ones(2, 3), "steps": torch.arange(4)}, "epoch": 3, "tags": [1, 2.5, None],
         "raw": (b"x", True), "half": torch.zeros(2, dtype=torch.bfloat16)}
_, _NAMES, _TENSORS = snapshot._flatten(STATE, stage_on_host=False)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        with open(_PATH, "wb") as f:
            f.write(data[1:])
    else:
        _C.snapshot_write(_PATH, data[1:], _NAMES, _TENSORS, False)
    try:
        snapshot.load(_PATH)
    except (snapshot.CorruptSnapshotError, snapshot.UnsupportedSnapshotError):
        pass

