"""disttrain.trace: the timeline of DDP buckets, the backend's ops and backward,
as a Chrome trace merged across ranks (context manager and DISTTRAIN_TRACE)."""

from __future__ import annotations

import json
import os

from harness import run_ranks


def _traced_steps(rank, world_size, path, use_env):
    import torch
    from torch import nn

    import disttrain
    from disttrain import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    ddp = disttrain.DistributedDataParallel(model, bucket_cap_mb=0.1)
    x = torch.randn(8, 64)

    def step():
        model.zero_grad()
        with trace.span("forward"):
            out = ddp(x)
        out.square().sum().backward()

    if use_env:  # DISTTRAIN_TRACE: recording from the DDP construction on, written at exit
        assert trace.enabled()
        for _ in range(2):
            step()
        return len(ddp.bucket_plan())
    step()  # not recorded
    assert not trace.enabled()
    with trace.record(path):
        for _ in range(2):
            step()
    assert not trace.enabled()
    return len(ddp.bucket_plan())


def _check(path, buckets):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".part")]
    from disttrain import trace

    for rank in (0, 1):
        mine = [e for e in events if e.get("pid") == rank]
        names = {e["name"] for e in mine}
        assert {"backward", "finalize", "ready", "allreduce_coalesced", "idle"} <= names, names
        # Two steps: each bucket launched and completed twice, completion after launch.
        spans = trace.bucket_spans(events, rank)
        assert len(spans) == 2 * buckets and all(s <= e for s, e in spans), spans
        # Every bucket's collective ran, matched by sequence number (a one-tensor bucket is an allreduce).
        ops = {e["args"]["seq"]: e for e in mine if e["name"] in ("allreduce", "allreduce_coalesced")}
        bucket_seqs = [e["args"]["seq"] for e in mine if e.get("cat") == "ddp.bucket" and e["ph"] == "b"]
        assert set(bucket_seqs) <= set(ops), (bucket_seqs, sorted(ops))
        threads = {e["args"]["name"] for e in mine if e["name"] == "thread_name"}
        assert "disttrain progress" in threads, threads
        assert len(trace.spans_named(events, "backward", rank)) == 2
        total, hidden = trace.hidden(events, rank)
        assert 0 < total and 0 <= hidden <= total, (total, hidden)
    return events


def test_record_merges_ranks(tmp_path):
    path = str(tmp_path / "trace.json")
    buckets = run_ranks(_traced_steps, 2, args=(path, False), timeout=120)
    assert buckets[0] == buckets[1] > 2
    events = _check(path, buckets[0])
    assert {e["name"] for e in events if e.get("cat") == "python"} == {"forward"}
    # One step drawn: a picture comes out.
    from disttrain import trace

    trace.plot(events, str(tmp_path / "trace.png"), title="test")
    assert os.path.getsize(tmp_path / "trace.png") > 1000


def test_environment_variable(tmp_path):
    path = str(tmp_path / "env.json")
    buckets = run_ranks(_traced_steps, 2, args=(path, True), env={"DISTTRAIN_TRACE": path}, timeout=120)
    _check(path, buckets[0])


def _traced_without_world_size(rank, world_size, path):
    # A process group set up with explicit rank and world_size (mp.spawn style): no WORLD_SIZE variable.
    os.environ.pop("WORLD_SIZE")
    return _traced_steps(rank, world_size, path, True)


def test_environment_variable_with_a_group_but_no_world_size_variable(tmp_path):
    # Each rank used to take itself for the only one and write the file directly: the last writer won.
    path = str(tmp_path / "env.json")
    buckets = run_ranks(_traced_without_world_size, 2, args=(path,), env={"DISTTRAIN_TRACE": path}, timeout=120)
    _check(path, buckets[0])


def test_a_path_that_cannot_be_written_fails_before_recording(tmp_path, monkeypatch):
    import pytest

    from disttrain import trace

    (tmp_path / "a_file").write_text("")
    path = str(tmp_path / "a_file" / "trace.json")
    ran = []
    # Before: the block ran (the training) and leaving it raised FileExistsError: File exists.
    with pytest.raises(OSError, match=r"^disttrain.trace: cannot write the trace '.*a_file/trace.json': "
                                      r"'.*a_file' is a file, not a folder$"):
        with trace.record(path):
            ran.append(True)
    assert not ran and not trace.enabled()
    with pytest.raises(OSError, match="cannot write the trace '.*': it is a folder"):
        with trace.record(str(tmp_path)):
            ran.append(True)
    assert not ran
    monkeypatch.setenv(trace.ENV, path)
    monkeypatch.setattr(trace, "_from_env_started", False)
    with pytest.raises(OSError, match=r"cannot write the trace DISTTRAIN_TRACE='.*a_file/trace.json'"):
        trace.start_from_environment()
    assert not trace.enabled()
    # A folder that does not exist yet is created; a block that raises still writes and re-raises its error.
    path = str(tmp_path / "new" / "deeper" / "trace.json")
    with pytest.raises(KeyError, match="the block's own"):
        with trace.record(path):
            raise KeyError("the block's own")
    with open(path) as f:
        assert json.load(f)["traceEvents"]


def _traced_after_a_crashed_run(rank, world_size, path):
    import time

    import torch
    import torch.distributed as dist

    from disttrain import trace

    with trace.record(path):
        with trace.span("fresh"):
            dist.all_reduce(torch.ones(4))
        if rank == 1:
            time.sleep(1.0)  # rank 0 reaches the merge first, while rank 1's part is not written yet
    return True


def test_a_part_left_by_a_crashed_run_is_not_merged(tmp_path):
    # An earlier run died after rank 1 wrote its part and before rank 0 merged it. Rank 0 used to
    # take that stale part for rank 1's new one (merged it, removed it), and rank 1's real part was
    # left behind; each rank now removes its own old part when it starts recording.
    path = str(tmp_path / "trace.json")
    stale = [{"name": "stale", "cat": "python", "ph": "X", "ts": 0, "dur": 1, "pid": 1, "tid": 0}]
    with open(path + ".rank1.part", "w") as f:
        json.dump({"traceEvents": stale}, f)
    run_ranks(_traced_after_a_crashed_run, 2, args=(path,), timeout=120)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert "stale" not in {e["name"] for e in events}
    assert {e["pid"] for e in events if e["name"] == "fresh"} == {0, 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
