"""Data-parallel training throughput: disttrain DDP against torch DDP.

    disttrain bench ddp                         # 2 and 4 ranks, ResNet-18 and a wide MLP
    disttrain bench ddp --ranks 2 --models mlp --rounds 5

Each world size is one job (started with torchrun). In it, the same model and
data are trained by every configuration, taking turns step by step so that all see
the same machine:

    torch/gloo            torch.nn.parallel.DistributedDataParallel over gloo
    torch/disttrain       torch DDP over the disttrain backend
    disttrain/disttrain   disttrain.DistributedDataParallel over disttrain
    disttrain-bf16/...    the same with compression="bf16" (gradients in bf16 on the wire)
    disttrain/gloo        disttrain DDP over gloo: the reducer against torch's on one backend

The models span the regimes: ResNet-18 with the CIFAR stem (11.2 M
parameters, batch 8 of 32x32 images per rank) spends almost all of a step
computing (0.56 GFLOP per image forward); ``resnet18-tv``, the same network in
torchvision's layout (7x7 stride-2 stem and max-pool, as
``torchvision.models.resnet18`` applied to 32x32 images), computes 16x less
for the same 11.2 M gradients; the wide MLP (3072 -> 3072 -> 3072 -> 10,
18.9 M parameters, batch 16 per rank) spends most of a step communicating.

Configurations take turns step by step (rounds x steps timed steps each).
Reported per configuration: training steps per second (1 / median step time,
each step timed by its slowest rank), the ratio to torch/gloo and to torch/disttrain, and
for disttrain DDP the fraction of all-reduce time hidden behind backward:
all-reduce time is the union of [launch, completion] over buckets, and the
hidden part is what falls before backward finished. Rank threads are 1 (the
machine has 2 cores). Rank 0 writes ``benchmarks/results/ddp.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from disttrain.bench import format_or_dash, per_world_size_main, write_csv

CONFIGS = ("torch/gloo", "torch/disttrain", "disttrain/disttrain", "disttrain-bf16/disttrain", "disttrain/gloo")

MODELS = ("resnet18", "resnet18-tv", "mlp")  # --models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="world sizes, comma separated (default 2,4)")
    p.add_argument("--models", default="resnet18,resnet18-tv,mlp",
                   help="resnet18 (CIFAR stem), resnet18-tv (torchvision's ImageNet stem), mlp (default all)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run (default all)")
    p.add_argument("--resnet-batch", type=int, default=8, help="per-rank batch of 32x32 images (default 8)")
    p.add_argument("--mlp-batch", type=int, default=16, help="per-rank MLP batch (default 16)")
    p.add_argument("--mlp-hidden", type=int, default=3072, help="MLP hidden size (default 3072)")
    p.add_argument("--mlp-depth", type=int, default=2, help="MLP hidden layers (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each configuration times rounds x steps steps (default 4)")
    p.add_argument("--gradient-as-bucket-view", action="store_true", help="set it for every DDP (default off)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "ddp.csv"), help="CSV path")
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)  # worker -> launcher
    return p


def _model_and_batch(name, args, rank):
    import torch

    from disttrain import models

    g = torch.Generator().manual_seed(rank)
    if name in ("resnet18", "resnet18-tv"):
        stem = "imagenet" if name == "resnet18-tv" else "cifar"
        return (models.resnet18(num_classes=10, stem=stem), torch.randn(args.resnet_batch, 3, 32, 32, generator=g),
                torch.randint(0, 10, (args.resnet_batch,), generator=g))
    if name == "mlp":
        return (models.mlp(num_classes=10, in_features=3 * 32 * 32, hidden=args.mlp_hidden, depth=args.mlp_depth),
                torch.randn(args.mlp_batch, 3, 32, 32, generator=g),
                torch.randint(0, 10, (args.mlp_batch,), generator=g))
    raise ValueError(f"unknown model {name!r}; choose resnet18, resnet18-tv or mlp")


def _hidden_ns(trace) -> tuple[int, int]:
    """(all-reduce time, part of it before backward ended) for one backward, in ns."""
    spans = sorted(zip(trace["launch_ns"], trace["done_ns"]))
    total = hidden = 0
    start = end = None
    merged = []
    for s, e in spans:
        if end is None or s > end:
            if end is not None:
                merged.append((start, end))
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        merged.append((start, end))
    for s, e in merged:
        total += e - s
        hidden += max(0, min(e, trace["backward_end_ns"]) - s)
    return total, hidden


class _Runner:
    """One configuration: its own model replica, DDP wrapper and optimizer."""

    def __init__(self, config, model_name, args, groups, rank):
        import copy

        import torch
        from torch.nn.parallel import DistributedDataParallel as TorchDDP

        import disttrain

        self.config = config
        wrapper, backend = config.split("/")
        self.group = groups[backend]
        torch.manual_seed(0)
        model, self.x, self.y = _model_and_batch(model_name, args, rank)
        self.model = copy.deepcopy(model)
        kwargs = dict(gradient_as_bucket_view=args.gradient_as_bucket_view)
        if wrapper == "torch":
            self.ddp = TorchDDP(self.model, process_group=self.group, **kwargs)
        else:
            compression = "bf16" if wrapper.endswith("bf16") else None
            self.ddp = disttrain.DistributedDataParallel(self.model, process_group=self.group,
                                                         compression=compression, **kwargs)
        self.ours = wrapper != "torch"
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []
        self.comm_ns = self.hidden_ns = 0

    def step(self, record: bool) -> None:
        import torch.nn.functional as F

        self.opt.zero_grad()
        F.cross_entropy(self.ddp(self.x), self.y).backward()
        self.opt.step()
        if record and self.ours:
            total, hidden = _hidden_ns(self.ddp.last_backward_trace())
            self.comm_ns += total
            self.hidden_ns += hidden

    def timed_step(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)
        start = time.perf_counter()
        self.step(record=True)
        self.times.append(time.perf_counter() - start)

    def steps_per_s(self) -> float:
        """1 / median step time, each step timed by its slowest rank."""
        import torch
        import torch.distributed as dist

        times = torch.tensor(self.times, dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        return 1.0 / statistics.median(times.tolist())


def bench_rank(args) -> None:
    import gc

    import torch
    import torch.distributed as dist

    import disttrain

    torch.set_num_threads(1)
    disttrain.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {"disttrain": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    configs = [c for c in args.configs.split(",") if c]
    rows = []
    for model_name in [m for m in args.models.split(",") if m]:
        runners = [_Runner(c, model_name, args, groups, rank) for c in configs]
        for runner in runners:
            for _ in range(args.warmup):
                runner.step(record=False)
        # Configurations take turns step by step, so load from elsewhere on
        # the machine falls on all of them alike.
        for _ in range(args.rounds * args.steps):
            for runner in runners:
                runner.timed_step()
        params = sum(p.numel() for p in runners[0].model.parameters())
        for runner in runners:
            rows.append({
                "model": model_name, "world_size": world, "config": runner.config, "params": params,
                "steps_per_s": runner.steps_per_s(),
                "hidden_fraction": (runner.hidden_ns / runner.comm_ns) if runner.comm_ns else "",
            })
        del runners
        gc.collect()
    if rank == 0 and args.rows_file:
        with open(args.rows_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _report(rows, out) -> None:
    def rate(model, world, config):
        for r in rows:
            if (r["model"], r["world_size"], r["config"]) == (model, world, config):
                return r["steps_per_s"]
        return None

    for r in rows:
        gloo = rate(r["model"], r["world_size"], "torch/gloo")
        ours_backend = rate(r["model"], r["world_size"], "torch/disttrain")
        r["vs_torch_gloo"] = r["steps_per_s"] / gloo if gloo else ""
        r["vs_torch_disttrain"] = r["steps_per_s"] / ours_backend if ours_backend else ""
    print(f"{'model':<9} {'ranks':>5} {'config':<25} {'steps/s':>8} {'vs torch/gloo':>13} "
          f"{'vs torch/disttrain':>18} {'hidden':>7}")
    for r in rows:
        print(f"{r['model']:<9} {r['world_size']:>5} {r['config']:<25} {r['steps_per_s']:>8.3f} "
              f"{format_or_dash(r['vs_torch_gloo'], '>13.2f')} {format_or_dash(r['vs_torch_disttrain'], '>18.2f')} "
              f"{format_or_dash(r['hidden_fraction'], '>7.2f')}")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    return per_world_size_main("ddp", argv, build_parser, bench_rank, _report, lambda args: f"{args.models} x {args.configs}")


if __name__ == "__main__":
    sys.exit(main())
