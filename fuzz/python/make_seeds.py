"""Writes the fuzzers' seed inputs (fuzz/corpus/<target>/seed-*) and the real
sharded checkpoint the FSDP target loads (fuzz/seeds/fsdp_checkpoint). Run once
when a format changes; the outputs are committed. The fuzzers add what they
find beside the seeds (scripts/fuzz.sh --merge keeps the corpus minimal)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import torch
import torch.distributed as dist

import disttrain
from disttrain import _C, fsdp, snapshot
from disttrain.strategies import decentralised

FUZZ = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed(target: str, name: str, data: bytes) -> None:
    folder = os.path.join(FUZZ, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"seed-{name}"), "wb") as f:
        f.write(data)


def _snapshot_bytes(state) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.dts")
        snapshot.save(path, state, fsync=False)
        with open(path, "rb") as f:
            return f.read()


def snapshots() -> None:
    states = {
        "empty": {},
        "model": {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 3, "name": "x", "tags": [1, 2.5, None]},
        "mixed": {"a": torch.arange(5, dtype=torch.int64), "b": torch.ones(2, 2, dtype=torch.bfloat16),
                  "c": (b"raw", True), "d": torch.zeros(0)},
    }
    for name, state in states.items():
        data = _snapshot_bytes(state)
        _seed("snapshot_read", f"{name}-raw", b"\x00" + data)
        _seed("snapshot_read", f"{name}-fixcrc", b"\x01" + data)
        _seed("snapshot_load", f"{name}-raw", b"\x00" + data)
    import snapshot_load_fuzzer
    metadata, _, _ = snapshot._flatten(snapshot_load_fuzzer.STATE, stage_on_host=False)
    _seed("snapshot_load", "metadata", b"\x01" + metadata)


def fsdp_checkpoint() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("disttrain", rank=0, world_size=1)
    torch.manual_seed(0)
    model = disttrain.FullyShardedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)))
    out = os.path.join(FUZZ, "seeds", "fsdp_checkpoint")
    shutil.rmtree(out, ignore_errors=True)
    model.sharded_state_dict(out)
    dist.destroy_process_group()
    data = open(os.path.join(out, fsdp.MANIFEST), "rb").read()
    meta, _, _ = _C.snapshot_read(os.path.join(out, fsdp.MANIFEST))
    _seed("fsdp_manifest", "raw", b"\x00" + data)
    _seed("fsdp_manifest", "metadata", b"\x01" + meta)


def tcp() -> None:
    hello = struct.pack("<III16s", 0x4C454844, 1, 2, b"\x00" * 16)
    payload = struct.pack("<64f", *range(64))
    frame = struct.pack("<IBBBBQQqII", 0x31465444, 1, 1, 6, 0, 0, 64, 0, 0, len(payload)) + payload
    _seed("tcp_handshake", "valid", b"\x0f" + hello + frame)
    _seed("tcp_handshake", "two-frames", b"\x0f" + hello + frame[:40 + 128].replace(
        struct.pack("<I", 256), struct.pack("<I", 128), 1) + struct.pack("<IBBBBQQqII", 0x31465444, 1, 1, 6, 0, 0,
                                                                          64, 0, 0, 128) + payload[128:])
    _seed("tcp_handshake", "bad-hello", b"\x00" + b"\x00" * 28)


def averager() -> None:
    def message(phase: int, sender: int, part: int, wire: int, values: bytes, count: int) -> bytes:
        return struct.pack("<IBBBB32sQIIIfQdQ", 0x56415444, 1, phase, wire, 0, b"k" * 32, 1, sender, part, 2, 1.0,
                           count, 1.0, len(values)) + values
    _seed("group_averager", "phase1-f32", b"\x1f" + message(1, 1, 0, 0, struct.pack("<8f", *range(8)), 8))
    _seed("group_averager", "phase2-bf16", b"\x1f" + message(2, 1, 1, 1, b"\x80\x3f" * 8, 8))
    _seed("group_averager", "phase1-int8", b"\x1f" + message(1, 1, 0, 2, bytes(range(8)), 8))
    _seed("group_averager", "garbage", b"\x00" + b"GET / HTTP/1.0\r\n\r\n")


def control() -> None:
    peer = {"id": "p1", "host": "127.0.0.1", "port": 1, "data_port": 2, "round": 0, "samples": 0, "lineage": "x"}
    messages = {
        "heartbeat": {"kind": "heartbeat", "peer": peer, "view": [dict(peer, id="p2", age=0.5)]},
        "join": {"kind": "join", "peer": peer, "round": 0, "weight": 1.0},
        "outcome": {"kind": "outcome", "peer": peer, "round": 0, "attempt": 0, "ok": True, "bad": [], "gone": []},
        "get_state": {"kind": "get_state"},
    }
    for name, message in messages.items():
        _seed("decentralised_control", name, b"\x01" + json.dumps(message).encode())
    body = json.dumps(messages["heartbeat"]).encode()
    _seed("decentralised_control", "unsigned", b"\x00" + decentralised._FRAME.pack(len(body), b"\x00" * 32) + body)


if __name__ == "__main__":
    snapshots()
    fsdp_checkpoint()
    tcp()
    averager()
    control()
