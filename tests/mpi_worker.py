"""Rank side of tests/test_mpi.py, started by mpiexec (Open MPI). Writes one JSON
result per rank to OUT_DIR/rank_<r>.json; a failed check is recorded, not raised,
so every rank reports.

    mpiexec -n 5 python tests/mpi_worker.py OUT_DIR pipeline IMAGE_DIR
    mpiexec -n 2 python tests/mpi_worker.py OUT_DIR hosts IMAGE_DIR
"""

import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import disttrain
from disttrain import models
from disttrain.strategies import mpi


def _stages(model, fail_at=None):
    def read(entry):
        return mpi.read_image(entry[0])

    def resize(image):
        return F.interpolate(image.float()[None], size=(8, 8), mode="bilinear", align_corners=False,
                             antialias=True)[0]

    def normalise(image):
        if fail_at is not None and float(image.mean()) == fail_at:
            raise ValueError("corrupt image")
        return image / 255.0

    def predict(image):
        with torch.no_grad():
            return model(image[None])[0]

    return [("read", read), ("resize", resize), ("normalise", normalise), ("predict", predict)]


def _check_pipeline(rank, world, every_file, result):
    files = every_file if rank == 0 else []  # only rank 0's list is used
    torch.manual_seed(0)
    model = models.get_model("small_cnn", num_classes=10, in_channels=1).eval()
    stages = _stages(model)
    out = mpi.pipeline(stages, files, queue_depth=2)
    if rank == 0:
        serial = []
        for entry in files:
            value = entry
            for _, fn in stages:
                value = fn(value)
            serial.append(value)
        result["in_order"] = len(out.outputs) == len(files) and all(
            torch.equal(a, b) for a, b in zip(out.outputs, serial))
    result["stats"] = [vars(s) for s in out.stats]
    result["pipeline_scope_closed"] = mpi._C.step_memory_depth() == 0
    # The same as broadcasts (shared memory) and without the step-memory scope.
    out = mpi.pipeline(stages, files, queue_depth=2, transfer="broadcast", reuse_memory=False)
    if rank == 0:
        result["in_order_broadcast"] = len(out.outputs) == len(files) and all(
            torch.equal(a, b) for a, b in zip(out.outputs, serial))
    # Items of changing sizes (a resize message before each change), an empty one, 3 dtypes; an
    # error message longer than the last item (resized, not padded).
    sizes = [3, 3, 0, 5, 5, 5, 1, 2, 2, 7]
    make = ("make", lambda n: torch.arange(n * 2, dtype=torch.float64).reshape(n, 2))
    for transfer in ("broadcast", "sendrecv"):
        out = mpi.pipeline([make, ("half", lambda t: (t / 2).to(torch.float16 if len(t) % 2 else torch.int32))],
                           sizes if rank == 0 else [], queue_depth=2, transfer=transfer)
        if rank == 0:
            want = [(torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) / 2).to(
                torch.float16 if n % 2 else torch.int32) for n in sizes]
            result[f"sizes_{transfer}"] = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(out.outputs, want))

    def long_error(t):
        if len(t) == 7:  # item 9 only
            raise ValueError("x" * 1000)
        return t

    try:
        mpi.pipeline([make, ("long", long_error)], sizes if rank == 0 else [], queue_depth=2)
        result["long_error"] = None
    except mpi.PipelineError as e:
        result["long_error"] = str(e)
    try:
        mpi.pipeline(stages, files, transfer="carrier pigeon")
        result["bad_transfer"] = None
    except ValueError as e:
        result["bad_transfer"] = str(e)

    # A stage that raises stops the pipeline on every rank with that error.
    bad_mean = float(F.interpolate(mpi.read_image(every_file[7][0]).float()[None], size=(8, 8), mode="bilinear",
                                   align_corners=False, antialias=True)[0].mean())
    try:
        mpi.pipeline(_stages(model, fail_at=bad_mean), files, queue_depth=2)
        result["stage_error"] = None
    except mpi.PipelineError as e:
        result["stage_error"] = str(e)

    # Ranks that disagree on the stage count, queue_depth or transfer: one clear error on every rank,
    # not a hang (rank 0's single credit against the others' batches of 4 deadlocked).
    try:
        mpi.pipeline(stages, files, queue_depth=1 if rank == 0 else 8)
        result["disagreeing_ranks"] = None
    except ValueError as e:
        result["disagreeing_ranks"] = str(e)

    # More stages than ranks: a clear error, before any communication.
    try:
        mpi.pipeline(stages + [("extra", lambda t: t)] * (world - len(stages) + 1), files)
        result["too_many_stages"] = None
    except ValueError as e:
        result["too_many_stages"] = str(e)


def _check_training_pieces(rank, world, files, result):
    # Scatter: even, contiguous, everything exactly once.
    mine = mpi.scatter_files(files if rank == 0 else [])
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    result["scatter_sizes"] = [len(g) for g in gathered]
    result["scatter_complete"] = [tuple(e) for g in gathered for e in g] == [tuple(e) for e in files]
    try:
        mpi.scatter_files([f"f{i}" for i in range(world - 1)] if rank == 0 else [])
        result["scatter_error"] = None
    except ValueError as e:
        result["scatter_error"] = str(e)

    # Broadcast, then the fused average equals the mean of the ranks' gradients.
    torch.manual_seed(rank)
    model = models.get_model("small_cnn", num_classes=10, in_channels=1)
    mpi.broadcast_parameters(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    result["broadcast_equal"] = all(torch.equal(everyone[0], e) for e in everyone)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + rank))
    model(x).square().mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    all_grads = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(all_grads, grads)
    average = mpi.GradientAverager(model)
    with warnings.catch_warnings(record=True) as caught:  # torch's all_reduce_coalesced warns of its deprecation
        warnings.simplefilter("always")
        average()  # gradients backward allocated: averaged in place
    result["average_warnings"] = [str(w.message) for w in caught]
    averaged = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    result["average_error"] = float((averaged - torch.stack(all_grads).mean(0)).abs().max())
    average.zero_grad()  # gradients dropped; backward writes them once, in the step-memory scope
    model(x).square().mean().backward()
    average()
    again = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    result["average_in_place_error"] = float((again - torch.stack(all_grads).mean(0)).abs().max())
    # overlap=True: buckets launched from gradient hooks during backward, in the same order on every
    # rank; the same average. A second backward before the averager is an error, not a race.
    overlapped = mpi.GradientAverager(model, overlap=True, bucket_bytes=4096)
    result["overlap_buckets"] = len(overlapped._buckets)
    for _ in range(2):
        overlapped.zero_grad()
        model(x).square().mean().backward()
        overlapped()
    overlap_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    result["overlap_error"] = float((overlap_grads - torch.stack(all_grads).mean(0)).abs().max())
    overlapped.zero_grad()
    model(x).square().mean().backward()
    try:
        model(x).square().mean().backward()
        result["overlap_accumulate_error"] = None
    except RuntimeError as e:
        result["overlap_accumulate_error"] = str(e)
    overlapped()
    overlapped.close()
    model(x).square().mean().backward()  # no hook left: nothing is launched
    dist.barrier()
    result["overlap_closed"] = mpi._C.step_memory_depth() == 0 and not overlapped._hooks
    # A gradient of 2 MiB (above the reuse threshold): the next step's lands in the block the
    # step before used, with the same values.
    wide = torch.nn.Linear(512, 1024)
    mpi.broadcast_parameters(wide)
    wide_average = mpi.GradientAverager(wide)
    pointers, values = [], []
    for _ in range(3):
        wide_average.zero_grad()
        wide(x.reshape(4, -1).repeat(1, 8)).square().mean().backward()
        wide_average()
        pointers.append(wide.weight.grad.data_ptr())
        values.append(wide.weight.grad.clone())
    stats = wide_average.memory_stats()
    result["grads_reuse_memory"] = (stats["installed"] and stats["reused"] >= 2 and pointers[1] == pointers[2]
                                    and all(torch.equal(values[0], v) for v in values))
    result["step_memory_scope_closed"] = mpi._C.step_memory_depth() == 0


def main(out_dir, mode, image_dir):
    torch.set_num_threads(1)
    result = {"error": None}
    rank = -1
    try:
        rank, world = disttrain.init(timeout=60)
        result.update(rank=rank, world=world, master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                      local_rank=os.environ.get("LOCAL_RANK"),
                      job_port=(disttrain.distributed._derived_port(os.environ) or (None,))[0],
                      transport=dist.group.WORLD._get_backend(torch.device("cpu")).transport)
        files = mpi.image_files(image_dir) if rank == 0 else []
        if mode == "pipeline":
            _check_training_pieces(rank, world, mpi.image_files(image_dir), result)
            _check_pipeline(rank, world, mpi.image_files(image_dir), result)
        elif mode == "hosts":
            t = torch.full((1000,), float(rank + 1))
            dist.all_reduce(t)
            result["allreduce"] = float(t[0])
            torch.manual_seed(0)
            model = models.get_model("small_cnn", num_classes=10, in_channels=1).eval()
            stages = _stages(model)
            out = mpi.pipeline([stages[0], ("rest", lambda x: stages[3][1](stages[2][1](stages[1][1](x))))],
                               files[:12] if rank == 0 else [], queue_depth=2)
            if rank == 0:
                result["pipeline_items"] = len(out.outputs)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the test reads it
        result["error"] = traceback.format_exc()
    rank = rank if rank >= 0 else int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
