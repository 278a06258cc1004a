"""How the snapshot-loading atheris targets turn an input into a file: byte 0
is a mode. Even: the rest is the file as is. Odd: the rest is the JSON
metadata, written with the given tensors by the C++ writer as a well-formed
snapshot (valid checksums), so mutations reach what lies behind the checksums."""

from __future__ import annotations

import torch

from disttrain import _C


def write(path: str, data: bytes, names: list[str], tensors: list[torch.Tensor]) -> bool:
    """Writes ``data`` to ``path`` as described above; False for an empty input (nothing written)."""
    if not data:
        return False
    if data[0] % 2 == 0:
        with open(path, "wb") as f:
            f.write(data[1:])
    else:
        _C.snapshot_write(path, data[1:], names, tensors, False)
    return True
