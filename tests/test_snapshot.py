"""Snapshot format: exact round trips, corruption detection and fallback,
write errors that leave the previous snapshot intact, async writes."""

import collections
import errno
import logging
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from disttrain import _C, snapshot
from disttrain.snapshot import CorruptSnapshotError, SnapshotWriteError


def _training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    model(torch.randn(2, 1, 3, 3)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "epoch": 3, "run_time": 12.5, "best": float("inf"), "history": [0.5, 0.25], "name": "run",
        "nothing": None, "pair": (1, "a"), "blob": b"\x00\xff",
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_crc32c_known_value_and_combine():
    assert _C.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = os.urandom(200_003)
    for cut in (0, 1, 4097, 100_000, 200_003):
        assert _C.crc32c_combine(_C.crc32c(data[:cut]), _C.crc32c(data[cut:]), len(data) - cut) == _C.crc32c(data)


def test_round_trip_training_state(tmp_path):
    state = _training_state()
    snapshot.save(tmp_path / "s.dts", state)
    _assert_same(state, snapshot.load(tmp_path / "s.dts"))


def test_round_trip_dtypes_shapes_and_python_values(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "dtypes": [torch.randn(3).to(d) for d in (torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                                   torch.uint8, torch.int16, torch.int32, torch.int64)]
        + [torch.tensor([True, False]), torch.randn(2, dtype=torch.complex64)],
        "scalar": torch.tensor(7), "empty": torch.zeros(0, 5), "strided": torch.arange(12).reshape(3, 4).t(),
        "tied": [shared, shared], "numpy": np.arange(5, dtype=np.uint32), "npscalar": np.float32(1.5),
        "size": torch.Size([2, 3]), 7: "int key", (1, 2): "tuple key", "dtype": torch.bfloat16,
        "nested": collections.OrderedDict(a=[{"b": (None, True, -3, 2.0 ** 70)}]), "nan": float("nan"),
    }
    snapshot.save(tmp_path / "s.dts", state)
    back = snapshot.load(tmp_path / "s.dts")
    expected = dict(state, strided=state["strided"].contiguous())
    _assert_same(expected, back)
    assert back["tied"][0] is back["tied"][1]


def test_unsupported_object_names_its_place(tmp_path):
    with pytest.raises(TypeError, match="optimizer/param_groups"):
        snapshot.save(tmp_path / "s.dts", {"optimizer": {"param_groups": object()}})


def _corrupt_newest_setup(tmp_path):
    writer = snapshot.AsyncSnapshotter(tmp_path, keep=5)
    for step in (100, 200):
        writer.save({"step": step, "w": torch.full((1000,), float(step)), "fc.weight": torch.randn(256, 256)},
                    step=step)
        writer.wait()
    return writer.path_for(100), writer.path_for(200)


def test_truncated_snapshot_names_file_and_tensor_and_falls_back(tmp_path, caplog):
    older, newest = _corrupt_newest_setup(tmp_path)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size - 100_000)
    with pytest.raises(CorruptSnapshotError, match="truncated") as info:
        snapshot.load(newest)
    assert info.value.path == newest and info.value.tensor == "fc.weight"
    with caplog.at_level(logging.WARNING, logger="disttrain.snapshot"):
        path, state = snapshot.load_latest(tmp_path)
    assert path == older and state["step"] == 100
    assert "step_000000200.dts" in caplog.text and "fc.weight" in caplog.text
    assert "falling back to 'step_000000100.dts'" in caplog.text


def test_bit_flip_in_tensor_is_found_and_falls_back(tmp_path, caplog):
    older, newest = _corrupt_newest_setup(tmp_path)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:  # fc.weight is the last tensor: just before the 16-byte footer
        f.seek(size - 16 - 5000)
        byte = f.read(1)
        f.seek(size - 16 - 5000)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptSnapshotError, match=r"CRC mismatch in tensor 'fc.weight'") as info:
        snapshot.load(newest)
    assert info.value.tensor == "fc.weight"
    with caplog.at_level(logging.WARNING, logger="disttrain.snapshot"):
        assert snapshot.latest_good(tmp_path) == older
    assert "CRC mismatch in tensor 'fc.weight'" in caplog.text


def test_bit_flip_in_header_or_metadata(tmp_path):
    _, newest = _corrupt_newest_setup(tmp_path)
    original = open(newest, "rb").read()
    for offset, message in ((20, "header CRC"), (130, "metadata or tensor table")):
        damaged = bytearray(original)
        damaged[offset] ^= 1
        open(newest, "wb").write(damaged)
        with pytest.raises(CorruptSnapshotError, match=message) as info:
            snapshot.load(newest)
        assert info.value.tensor is None


def test_missing_and_all_corrupt(tmp_path):
    assert snapshot.load_latest(tmp_path / "nowhere") == (None, None)
    assert snapshot.latest_good(tmp_path) is None
    older, newest = _corrupt_newest_setup(tmp_path)
    os.remove(newest)
    assert snapshot.latest_good(tmp_path) == older
    open(older, "wb").write(b"not a snapshot at all, but long enough to hold a header" * 10)
    with pytest.raises(CorruptSnapshotError, match="bad magic"):
        snapshot.load(older)
    assert snapshot.latest_good(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        snapshot.load(newest)


def test_async_keeps_last_k_and_stages_a_copy(tmp_path):
    writer = snapshot.AsyncSnapshotter(tmp_path, keep=2)
    weights = torch.zeros(1 << 16)
    for step in range(1, 5):
        weights.fill_(step)
        writer.save({"w": weights, "step": step}, step=step)
        weights.fill_(-1)  # training goes on; the snapshot must hold the value at save time
    writer.wait()
    paths = snapshot.list_snapshots(tmp_path)
    assert [os.path.basename(p) for p in paths] == ["step_000000003.dts", "step_000000004.dts"]
    state = snapshot.load(paths[-1])
    assert state["step"] == 4 and torch.all(state["w"] == 4)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_full_disk_is_a_clear_error_and_keeps_previous(tmp_path, monkeypatch):
    writer = snapshot.AsyncSnapshotter(tmp_path, keep=1)
    writer.save({"w": torch.ones(100_000)}, step=1)
    writer.wait()
    monkeypatch.setenv("DISTTRAIN_SNAPSHOT_FAULT", "enospc:50000")
    writer.save({"w": torch.full((100_000,), 2.0)}, step=2)  # the error comes from the background thread
    with pytest.raises(SnapshotWriteError, match="No space left on device") as info:
        writer.wait()
    assert info.value.errno == errno.ENOSPC and "previous snapshot is untouched" in str(info.value)
    # keep=1 would have deleted step 1 after a successful write; it did not, and no temp file is left.
    assert [os.path.basename(p) for p in snapshot.list_snapshots(tmp_path)] == ["step_000000001.dts"]
    assert torch.all(snapshot.load(writer.path_for(1))["w"] == 1)
    assert os.listdir(tmp_path) == ["step_000000001.dts"]
    # Raised on the next save too, when nobody waited.
    writer.save({"w": torch.ones(100_000)}, step=3)
    with pytest.raises(SnapshotWriteError):
        writer.save({"w": torch.ones(100_000)}, step=4)
    monkeypatch.delenv("DISTTRAIN_SNAPSHOT_FAULT")
    writer.save({"w": torch.ones(10)}, step=5)
    assert writer.wait() == writer.path_for(5)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SnapshotWriteError, match="Not a directory"):
        snapshot.save(blocker / "s.dts", {"w": torch.ones(3)})
    with pytest.raises(SnapshotWriteError):
        snapshot.save(tmp_path / "missing" / "s.dts", {"w": torch.ones(3)})


_KILLED_WRITER = """
import sys, torch
from disttrain import snapshot
writer = snapshot.AsyncSnapshotter(sys.argv[1], keep=1)
writer.save({"w": torch.full((1 << 20,), 2.0)}, step=2)
writer.wait()
"""


def test_kill_during_write_leaves_previous_snapshot(tmp_path):
    snapshot.save(tmp_path / "step_000000001.dts", {"w": torch.ones(1 << 20)})
    env = dict(os.environ, DISTTRAIN_SNAPSHOT_FAULT="kill:1000000")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env)
    assert proc.returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(leftovers) == 1  # the torn temporary file, never under the snapshot's name
    path, state = snapshot.load_latest(tmp_path)
    assert path.endswith("step_000000001.dts") and torch.all(state["w"] == 1)
    snapshot.AsyncSnapshotter(tmp_path)  # a new writer removes the dead process's temporary file
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_export_gives_plain_torch_file(tmp_path):
    state = _training_state()
    snapshot.save(tmp_path / "s.dts", state)
    exported = snapshot.export(tmp_path / "s.dts", tmp_path / "model.pt", key="model")
    loaded = torch.load(tmp_path / "model.pt")
    _assert_same(state["model"], loaded)
    _assert_same(exported, loaded)


_HEADER = struct.Struct("<8sII8QI44x")  # csrc/snapshot/snapshot_format.h: Header (128 bytes)


def _rewrite_header(path, **fields):
    """Rewrites header fields and gives the header a valid CRC again: what a
    hostile or buggy writer could produce."""
    with open(path, "r+b") as f:
        raw = f.read(_HEADER.size)
        names = ["magic", "version", "header_crc", "metadata_offset", "metadata_length", "table_offset",
                 "table_length", "tensor_count", "data_offset", "data_length", "file_length", "metadata_table_crc"]
        h = dict(zip(names, _HEADER.unpack(raw)))
        h.update(fields, header_crc=0)
        crc = _C.crc32c(_HEADER.pack(*(h[n] for n in names)))
        h["header_crc"] = crc
        f.seek(0)
        f.write(_HEADER.pack(*(h[n] for n in names)))
        return h


def _load_in_child(path):
    """Loads in a fresh interpreter: a crash (segfault) is a failed test, not a dead test run."""
    code = ("import sys\nfrom disttrain import snapshot\n"
            "try:\n    snapshot.load(sys.argv[1])\nexcept snapshot.CorruptSnapshotError as e:\n"
            "    print('CORRUPT', e)\nexcept MemoryError:\n    print('MEMORYERROR')\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["terabyte_metadata", "offsets_wrap", "huge_tensor_count"])
def test_hostile_header_with_valid_crc_is_corrupt_before_any_allocation(tmp_path, case):
    path = tmp_path / "s.dts"
    snapshot.save(path, {"w": torch.arange(10.0)})
    with open(path, "rb") as f:
        h = dict(zip(["magic", "version", "header_crc", "metadata_offset", "metadata_length", "table_offset",
                      "table_length", "tensor_count", "data_offset", "data_length", "file_length",
                      "metadata_table_crc"], _HEADER.unpack(f.read(_HEADER.size))))
    if case == "terabyte_metadata":  # self-consistent offsets, a terabyte before the data
        meta = 1 << 40
        table_offset = h["metadata_offset"] + meta
        data_offset = table_offset + h["table_length"]
        _rewrite_header(path, metadata_length=meta, table_offset=table_offset, data_offset=data_offset,
                        file_length=data_offset + h["data_length"] + 16)
    elif case == "offsets_wrap":  # data_offset + data_length + 16 wraps around 2^64 to a small file length
        data_length = (1 << 64) - 8
        _rewrite_header(path, data_length=data_length, file_length=(h["data_offset"] + data_length + 16) % (1 << 64))
    else:
        _rewrite_header(path, tensor_count=(1 << 62))
    out = _load_in_child(path)
    assert out.returncode == 0, f"the load crashed (status {out.returncode}): {out.stderr[-2000:]}"
    assert out.stdout.startswith("CORRUPT"), out.stdout + out.stderr[-2000:]
    assert "s.dts" in out.stdout


def test_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # The child plants links at the names its own first saves would use (its pid, counters 0..7).
    code = ("import os, sys, torch\nfrom disttrain import snapshot\n"
            "d, victim = sys.argv[1], sys.argv[2]\n"
            "for n in range(8):\n    os.symlink(victim, os.path.join(d, f'.s.dts.tmp.{os.getpid()}.{n}'))\n"
            "try:\n    snapshot.save(os.path.join(d, 's.dts'), {'w': torch.ones(4)})\n"
            "except snapshot.SnapshotWriteError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(victim)], capture_output=True, text=True,
                         timeout=120)
    assert victim.read_text() == "precious"
    assert out.stdout.startswith("REFUSED") and "File exists" in out.stdout, out.stdout + out.stderr[-2000:]
    assert not (tmp_path / "s.dts").exists()


def _history(epochs):
    from disttrain.train_metrics import _PER_EPOCH

    return {key: [0.5] * epochs for key in _PER_EPOCH}


def test_snapshot_and_metrics_modes_follow_the_umask(tmp_path):
    from disttrain.train_metrics import write_metrics_csv

    old = os.umask(0o027)
    try:
        snapshot.save(tmp_path / "s.dts", {"w": torch.ones(2)})
        write_metrics_csv(str(tmp_path / "metrics.csv"), _history(1), {})
    finally:
        os.umask(old)
    assert (tmp_path / "s.dts").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "metrics.csv").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "s.dts"]  # no temporary file left


def test_metrics_csv_never_writes_through_a_planted_symlink(tmp_path):
    from disttrain.train_metrics import write_metrics_csv

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "metrics.csv.tmp")  # the name it used to write to
    write_metrics_csv(str(tmp_path / "metrics.csv"), _history(2), {"model_name": "m"})
    assert victim.read_text() == "precious"
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3


def test_keep_last_k_never_counts_a_failed_write(tmp_path, monkeypatch):
    """A write that failed is not on disk: the rule keeps K snapshots that are.
    (It used to count the write in flight when the next save was queued, so a
    failed one cost a good snapshot.)"""
    writer = snapshot.AsyncSnapshotter(tmp_path, keep=2)
    writer.save({"w": torch.ones(100_000)}, step=1)
    writer.wait()
    monkeypatch.setenv("DISTTRAIN_SNAPSHOT_FAULT", "enospc:50000")
    writer.save({"w": torch.full((100_000,), 2.0)}, step=2)  # fails in the background
    monkeypatch.delenv("DISTTRAIN_SNAPSHOT_FAULT")
    with pytest.raises(SnapshotWriteError):
        writer.save({"w": torch.full((100_000,), 3.0)}, step=3)  # step 2's error; step 3 is not started
    writer.save({"w": torch.full((100_000,), 3.0)}, step=3)  # the caller carries on
    writer.wait()
    # Two on disk: step 1 and step 3 (step 2 never was).
    assert [os.path.basename(p) for p in snapshot.list_snapshots(tmp_path)] == \
        ["step_000000001.dts", "step_000000003.dts"]
    writer.save({"w": torch.full((100_000,), 4.0)}, step=4)
    writer.wait()
    assert [os.path.basename(p) for p in snapshot.list_snapshots(tmp_path)] == \
        ["step_000000003.dts", "step_000000004.dts"]


def test_keep_last_k_deletes_only_its_own_prefix(tmp_path):
    """Other files ending in digits + .dts in the same folder (another writer's,
    a user's copy) are not this writer's to delete."""
    foreign = ["best_000000001.dts", "backup2.dts", "my_step_000000001.dts", "epoch_5.dts"]
    for name in foreign:
        snapshot.save(tmp_path / name, {"mine": False})
    writer = snapshot.AsyncSnapshotter(tmp_path, keep=1)
    for step in (1, 2, 3):
        writer.save({"mine": True}, step=step)
    writer.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(foreign + ["step_000000003.dts"])


def _set_version(path, version):
    _rewrite_header(path, version=version)


def test_load_latest_falls_back_on_unreadable_and_unsupported_snapshots(tmp_path, caplog):
    """Not only corrupt or missing files: one of a newer format version and one
    the system cannot read (an I/O error: here EISDIR) are skipped too."""
    older, newest = _corrupt_newest_setup(tmp_path)
    _set_version(newest, 99)
    with pytest.raises(snapshot.UnsupportedSnapshotError, match="format version 99") as info:
        snapshot.load(newest)
    assert info.value.path == newest and info.value.version == 99
    with caplog.at_level(logging.WARNING, logger="disttrain.snapshot"):
        path, state = snapshot.load_latest(tmp_path)
    assert path == older and state["step"] == 100
    assert "format version 99" in caplog.text and "falling back to 'step_000000100.dts'" in caplog.text

    unreadable = tmp_path / "step_000000300.dts"
    unreadable.mkdir()  # opens, then every read fails with EISDIR: an OSError, as EIO would be
    with pytest.raises(OSError) as oserror:
        snapshot.load(unreadable)
    assert oserror.value.errno == errno.EISDIR and oserror.value.filename == str(unreadable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="disttrain.snapshot"):
        path, state = snapshot.load_latest(tmp_path)
    assert path == older and state["step"] == 100
    assert "step_000000300.dts' cannot be read" in caplog.text


def test_failed_directory_fsync_does_not_claim_the_previous_snapshot_is_untouched(tmp_path, monkeypatch):
    """After the rename the previous file is gone: the error says the new one is
    in place (and may not survive a machine crash), never 'untouched'."""
    path = tmp_path / "s.dts"
    snapshot.save(path, {"v": 1})
    monkeypatch.setenv("DISTTRAIN_SNAPSHOT_FAULT", "dirfsync")
    with pytest.raises(SnapshotWriteError) as info:
        snapshot.save(path, {"v": 2})
    message = str(info.value)
    assert "untouched" not in message, message
    assert "renamed into place" in message and "fsync of its directory" in message, message
    assert info.value.errno == errno.EIO and info.value.replaced_target is True
    assert snapshot.load(path) == {"v": 2}
    # The async writer reports it the same way and keeps the older snapshots (nothing is deleted).
    writer = snapshot.AsyncSnapshotter(tmp_path / "a", keep=1)
    monkeypatch.delenv("DISTTRAIN_SNAPSHOT_FAULT")
    writer.save({"v": 1}, step=1)
    writer.wait()
    monkeypatch.setenv("DISTTRAIN_SNAPSHOT_FAULT", "dirfsync")
    writer.save({"v": 2}, step=2)
    with pytest.raises(SnapshotWriteError, match="renamed into place") as info:
        writer.wait()
    assert info.value.replaced_target is True
    assert [os.path.basename(p) for p in snapshot.list_snapshots(tmp_path / "a")] == \
        ["step_000000001.dts", "step_000000002.dts"]
    # An ordinary write error still says the previous file is untouched, and is not "replaced".
    monkeypatch.setenv("DISTTRAIN_SNAPSHOT_FAULT", "enospc:10")
    with pytest.raises(SnapshotWriteError, match="untouched") as info:
        snapshot.save(path, {"v": 3})
    assert info.value.replaced_target is False
