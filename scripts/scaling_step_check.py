"""The scaling study's training step timed three ways in one job, taking turns step by step (so all
three see the same machine load): disttrain DDP on the disttrain backend, PyTorch DDP on a gloo group,
and no DDP (the floor). Small CNN, embedded digits, batch 32 per rank; median of the timed steps, slowest
rank. Used to tell an implementation's cost from load drift in `disttrain bench scaling` (README, Results).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 scripts/scaling_step_check.py 200
"""
import os, sys, time, json, torch, torch.distributed as dist
import disttrain
from disttrain import models, data
torch.set_num_threads(1)
disttrain.init()
rank, world = dist.get_rank(), dist.get_world_size()
gloo = dist.new_group(backend="gloo")
ds = data.digits(True)
x = torch.stack([ds[i][0] for i in range(32)]); y = torch.tensor([int(ds[i][1]) for i in range(32)])
def make(kind):
    torch.manual_seed(0)
    m = models.small_cnn()
    if kind == "disttrain":
        w = disttrain.DistributedDataParallel(m)
    elif kind == "pytorch":
        w = torch.nn.parallel.DistributedDataParallel(m, process_group=gloo)
    else:
        w = m
    return w, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
kinds = ["disttrain", "pytorch", "none"]
runners = {k: make(k) for k in kinds}
times = {k: [] for k in kinds}
R = int(sys.argv[1]) if len(sys.argv) > 1 else 300
for i in range(R):
    order = kinds[i % 3:] + kinds[:i % 3]
    for k in order:
        w, opt = runners[k]
        dist.barrier(gloo)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(w(x), y).backward()
        opt.step()
        if i >= 10:
            times[k].append(time.perf_counter() - t)
med = {}
for k in kinds:
    s = sorted(times[k]); med[k] = s[len(s)//2]
t = torch.tensor([med[k] for k in kinds], dtype=torch.float64)
dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gloo)
if rank == 0:
    print(json.dumps({"world": world, **{k: round(1e3 * float(v), 3) for k, v in zip(kinds, t)}}))
dist.destroy_process_group()
