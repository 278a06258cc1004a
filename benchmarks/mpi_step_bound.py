"""Where disttrain's MPI-style step goes against the mpi4py recipe, and the best ratio possible (issue 15).

    OMP_NUM_THREADS=1 mpiexec --oversubscribe --allow-run-as-root -n 2 python benchmarks/mpi_step_bound.py
    MODEL=mlp ROUNDS=8 ...   (default resnet18-tv, 6 rounds of 3 steps, the configurations in turns)

The same model, batch (8) and optimizer as `disttrain bench mpi`, one job:
    recipe     the mpi4py recipe (comm.Allreduce of each gradient through numpy)
    ours       GradientAverager: zero_grad (step memory), backward, one all-reduce, optimizer
    floor      the step without any communication (optimizer.zero_grad, backward, optimizer)
    floor_sm   the same in GradientAverager's step-memory scope (our step less its all-reduce)
    comm_only  the all-reduce of the gradients alone (all_reduce_coalesced, AVG)
    ovl        GradientAverager(overlap=True)
Prints the median wall time per step (slowest rank) and each rank's CPU time per step, then
recipe / (floor_sm + comm_only's CPU): with one core per rank the all-reduce's copies and sums run
on the rank's own core, so overlapping them with backward cannot take them off the step; only
waiting can be hidden. The models' parameters are compared with ours' at the end (relative).
"""
import os, time, resource, statistics, torch, torch.distributed as dist, torch.nn.functional as F
import numpy as np
from mpi4py import MPI
import disttrain
from disttrain.strategies import mpi
from disttrain.bench.mpi import _model
rank, world = disttrain.init(); comm = MPI.COMM_WORLD
name = os.environ.get("MODEL", "resnet18-tv")
torch.manual_seed(0)
g = torch.Generator().manual_seed(100 + rank)
x = torch.randn(8, 3, 32, 32, generator=g); y = torch.randint(0, 10, (8,), generator=g)
nets = {c: _model(name) for c in ("recipe", "ours", "floor", "floor_sm", "ovl")}
base = nets["ours"].state_dict()
for n in nets.values(): n.load_state_dict(base)
opts = {c: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for c, n in nets.items()}
avg = mpi.GradientAverager(nets["ours"])
avg_floor = mpi.GradientAverager(nets["floor_sm"])
extra = {"ovl": mpi.GradientAverager(nets["ovl"], overlap=True)}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
def recipe():
    net, opt = nets["recipe"], opts["recipe"]; opt.zero_grad(); F.cross_entropy(net(x), y).backward()
    for p in net.parameters():
        grad = p.grad.numpy(); total = np.empty_like(grad); comm.Allreduce(grad, total, op=MPI.SUM); p.grad = torch.from_numpy(total / world)
    opt.step()
def ours():
    avg.zero_grad(); F.cross_entropy(nets["ours"](x), y).backward(); avg(); opts["ours"].step()
def floor():
    opts["floor"].zero_grad(); F.cross_entropy(nets["floor"](x), y).backward(); opts["floor"].step()
def floor_sm():
    avg_floor.zero_grad(); F.cross_entropy(nets["floor_sm"](x), y).backward(); avg_floor._close_scope(); opts["floor_sm"].step()
grads = [torch.randn_like(p) for p in nets["ours"].parameters()]
def comm_only():
    dist.all_reduce_coalesced(grads, op=dist.ReduceOp.AVG)
def ovl():
    a = extra["ovl"]; a.zero_grad(); F.cross_entropy(nets["ovl"](x), y).backward(); a(); opts["ovl"].step()
steps = {"recipe": recipe, "ours": ours, "floor": floor, "floor_sm": floor_sm, "comm_only": comm_only, "ovl": ovl}
for s in steps.values():
    for _ in range(3): s()
res = {k: [] for k in steps}
for _ in range(int(os.environ.get("ROUNDS", "6"))):
    for k, s in steps.items():
        dist.barrier(); c0 = cpu(); t0 = time.perf_counter()
        for _ in range(3): s()
        w = torch.tensor([time.perf_counter() - t0], dtype=torch.float64); c = (cpu() - c0) / 3
        dist.all_reduce(w, op=dist.ReduceOp.MAX)
        res[k].append((float(w) / 3 * 1000, c * 1000))
ref = torch.cat([p.detach().reshape(-1) for p in nets["ours"].parameters()])
for c in steps:
    if c in nets:
        got = torch.cat([p.detach().reshape(-1) for p in nets[c].parameters()])
        if c != "floor" and c != "floor_sm": print(rank, c, "max rel diff vs ours", float((got - ref).abs().max() / ref.abs().max()), flush=True)
out = [None] * world; dist.all_gather_object(out, res)
if rank == 0:
    print(f"{name}: median ms/step wall (slowest rank), cpu per rank")
    for k in steps:
        wall = statistics.median(v[0] for v in out[0][k]); cpus = [round(statistics.median(v[1] for v in o[k]), 1) for o in out]
        print(f"  {k:10s} {wall:7.1f}  cpu {cpus}")
    med = {k: statistics.median(v[0] for v in out[0][k]) for k in steps}
    comm_cpu = statistics.mean(statistics.median(v[1] for v in o["comm_only"]) for o in out)
    bound = med["recipe"] / (med["floor_sm"] + comm_cpu)
    print(f"  ratios vs recipe: ours {med['recipe'] / med['ours']:.2f}x" + (f", overlap {med['recipe'] / med['ovl']:.2f}x" if "ovl" in med else "")
          + f"; bound recipe/(floor_sm + comm cpu {comm_cpu:.1f}) = {bound:.2f}x; recipe/(floor + comm wall) = {med['recipe'] / (med['floor'] + med['comm_only']):.2f}x")
dist.destroy_process_group()
