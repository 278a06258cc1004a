"""Data-parallel training throughput: disttrain DDP against torch DDP.

    disttrain bench ddp                         # 2 and 4 ranks, ResNet-18 and a wide MLP
    disttrain bench ddp --ranks 2 --models mlp --rounds 5

Each world size is one job (started with torchrun). In it, the same model and
data are trained by every configuration, taking turns step by step so that all see
the same machine:

    torch/gloo            torch.nn.parallel.DistributedDataParallel over gloo
    torch/disttrain       torch DDP over the disttrain backend
    disttrain/disttrain   disttrain.DistributedDataParallel over disttrain (its defaults: with one torch
                          thread per rank and ranks >= cores, no overlap, one bucket at the end)
    disttrain-overlap/... overlap=True: buckets all-reduced while backward runs, whatever the cores
    disttrain-bf16/...    disttrain/... with compression="bf16" (gradients in bf16 on the wire)
    disttrain-fused/...   (on request only) disttrain/... with the SGD step fused into backward
                          (ddp.fuse_optimizer(opt): each parameter updated as its averaged gradient
                          comes back; optimizer.step() then only checks)
    disttrain-caller/...  disttrain DDP with overlap=True, reduce_on_caller=True: the thread that
                          completes a bucket (backward's) all-reduces it itself, no progress thread
    disttrain-handoff/... (on request only) overlap=True, reduce_on_caller=False: every bucket on the progress
                          thread, the last one too (the default, "last", reduces that one on
                          backward's thread when nothing else is in flight)
    disttrain/gloo        disttrain DDP over gloo: the reducer against torch's on one backend
    disttrain...@MB/...   any disttrain DDP configuration with bucket_cap_mb=MB
                          (disttrain-caller@4/disttrain: a bucket-size sweep)
    disttrain/disttrain-slot4m  disttrain DDP over a disttrain group with 4 MiB shared-memory
                          slots (shm_slot_bytes; the default is 1 MiB)
    disttrain/disttrain-sleep, disttrain/disttrain-yield  (on request only) over a disttrain group whose
                          shared-memory waits sleep at once, or yield the core first (shm_wait)
    disttrain/disttrain-slot1m, -slot2m  (on request only) 1 or 2 MiB shared-memory slots
    no-comm               the floor: the same step with disttrain DDP under no_sync() (no
                          communication at all); every configuration's step is reported as a
                          multiple of it (`x floor`)
    no-comm+fused-sgd     (on request only) the floor with torch's fused CPU SGD (SGD(fused=True),
                          torch >= 2.4): the quickest no-communication step torch offers
    disttrain-torchfused/...  (on request only) disttrain/... with torch's fused CPU SGD: the
                          quickest step a user gets without fuse_optimizer
    no-comm+copy          the floor plus one copy of every gradient, made as backward produces it:
                          the least memory traffic any full-precision all-reduce adds to a rank
                          (read its gradient, write the result). Where every core computes (one
                          thread per rank, ranks = cores), no data-parallel step can go below it
    torch-best/gloo       with ``--peers torch-best``: torch DDP at its best settings on CPU
    torch-best/disttrain  (gradient_as_bucket_view=True, static_graph=True, bucket_cap_mb from
                          --best-bucket-mb), over gloo and over the disttrain backend
    torch-best-bf16/...   with ``--peers torch-best-bf16``: the same with PyTorch's bf16_compress_hook (gradients cast to bf16
                          for the all-reduce), the peer of disttrain-bf16's bf16 wire
                          (with several --best-bucket-mb values, each is a configuration of its
                          own, named torch-best@MB/...: the bucket-size sweep)
    comm-only             the communication alone: the gradients all-reduced as disttrain DDP
                          does (its buckets, AVG, launched together, then waited for), no compute;
                          its `x floor` is (floor + this) / floor, the step if nothing were hidden

The models span the regimes: ResNet-18 with the CIFAR stem (11.2 M
parameters, batch 8 of 32x32 images per rank) spends almost all of a step
computing (0.56 GFLOP per image forward); ``resnet18-tv``, the same network in
torchvision's layout (7x7 stride-2 stem and max-pool, as
``torchvision.models.resnet18`` applied to 32x32 images), computes 16x less
for the same 11.2 M gradients; the wide MLP (3072 -> 3072 -> 3072 -> 10,
18.9 M parameters, batch 16 per rank) spends most of a step communicating.

Configurations take turns step by step (rounds x steps timed steps each), in a
new order each turn (seeded: the same on every rank and in every run).
Reported per configuration: training steps per second (1 / median step time,
each step timed by its slowest rank), the step time as a multiple of the
no-communication step's (``x floor``), the ratio to torch/gloo and to torch/disttrain, and
for disttrain DDP the fraction of all-reduce time hidden behind backward,
read from the timeline (``disttrain.trace``, recording during every timed step
of every configuration): all-reduce time is the union of the buckets'
[launch, completion] spans, and the hidden part is what falls inside DDP's
backward span. ``vs best torch`` is the step rate over the fastest torch DDP configuration
of the same run (torch/*, torch-best*). ``--trace DIR`` also writes the last timed step of each
configuration as a Chrome trace (all ranks) and a picture of it. Rank threads are 1 (the
machine has 2 cores). Rank 0 writes ``benchmarks/results/ddp.csv``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import statistics
import sys
import time

from disttrain.bench import format_or_dash, per_world_size_main, write_csv

# Backends besides gloo and the default disttrain group: disttrain groups with pg_options.
GROUP_OPTIONS = {"disttrain-slot4m": {"shm_slot_bytes": str(4 << 20)},
                 "disttrain-slot1m": {"shm_slot_bytes": str(1 << 20)}, "disttrain-slot2m": {"shm_slot_bytes": str(2 << 20)},
                 "disttrain-sleep": {"shm_wait": "sleep"}, "disttrain-yield": {"shm_wait": "yield"}}
DEFAULT_CONFIGS = ("torch/gloo", "torch/disttrain", "disttrain/disttrain", "disttrain-overlap/disttrain",
                   "disttrain-bf16/disttrain", "disttrain-caller/disttrain", "disttrain/gloo", "disttrain/disttrain-slot4m", "no-comm",
                   "no-comm+copy", "comm-only")
CONFIGS = DEFAULT_CONFIGS + ("disttrain-fused/disttrain", "disttrain-torchfused/disttrain", "no-comm+fused-sgd",
                              "disttrain-handoff/disttrain", "disttrain/disttrain-sleep", "disttrain/disttrain-yield",
                              "disttrain/disttrain-slot1m", "disttrain/disttrain-slot2m")
# The floor: disttrain DDP's step under no_sync(), the same compute without communication.
FLOOR = "no-comm"
#: --peers torch-best: torch DDP at its best settings (wrapper names; each over gloo and disttrain).
PEERS = {"torch-best": ("torch-best",), "torch-best-bf16": ("torch-best-bf16",)}
COMM_ONLY = "comm-only"
# The floor plus one copy of each gradient, made as backward produces it (while it is hottest in
# cache): the least memory traffic a full-precision all-reduce adds to a rank (read its gradient,
# write the result), with nothing else of one. On cores that all compute, no DDP step goes below it.
FLOOR_COPY = "no-comm+copy"
# The floor with torch's fused CPU SGD (one pass over each parameter's state).
FLOOR_FUSED_SGD = "no-comm+fused-sgd"

MODELS = ("resnet18", "resnet18-tv", "mlp")  # --models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="world sizes, comma separated (default 2,4)")
    p.add_argument("--models", default="resnet18,resnet18-tv,mlp",
                   help="resnet18 (CIFAR stem), resnet18-tv (torchvision's ImageNet stem), mlp (default all)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="configurations to run (default all but the on-request ones: disttrain-fused, disttrain-handoff, "
                        "disttrain-sleep, disttrain-yield, disttrain-slot1m, disttrain-slot2m)")
    p.add_argument("--resnet-batch", type=int, default=8, help="per-rank batch of 32x32 images (default 8)")
    p.add_argument("--mlp-batch", type=int, default=16, help="per-rank MLP batch (default 16)")
    p.add_argument("--mlp-hidden", type=int, default=3072, help="MLP hidden size (default 3072)")
    p.add_argument("--mlp-depth", type=int, default=2, help="MLP hidden layers (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each configuration times rounds x steps steps (default 4)")
    p.add_argument("--gradient-as-bucket-view", action="store_true", help="set it for every DDP (default off)")
    p.add_argument("--peers", default="", help="torch-best, torch-best-bf16: torch DDP at its best settings, without and with its bf16 "
                        "compression hook (see above)")
    p.add_argument("--best-bucket-mb", default="25",
                   help="bucket_cap_mb of the torch-best configurations; several (comma separated) sweep it (default 25)")
    p.add_argument("--best-backends", default="gloo,disttrain", help="backends of the torch-best configurations")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "ddp.csv"), help="CSV path")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write each configuration's last timed step as a Chrome trace and a PNG into DIR")
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)  # worker -> launcher
    return p


def check_args(args: argparse.Namespace, backends: list[str]) -> None:
    """The command line's check before a rank starts (ValueError, one line): the torch-best settings."""
    import math

    caps = [c.strip() for c in args.best_bucket_mb.split(",") if c.strip()]
    try:
        good = bool(caps) and all(math.isfinite(float(c)) and float(c) > 0 for c in caps)
    except ValueError:
        good = False
    if not good:
        raise ValueError(f"--best-bucket-mb {args.best_bucket_mb!r}: expected bucket sizes in MB > 0, comma separated "
                         "(e.g. 25 or 5,25,100)")
    chosen = [b.strip() for b in args.best_backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in backends]
    if unknown or not chosen:
        raise ValueError(f"--best-backends {args.best_backends!r}: unknown "
                         f"{', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(backends)}")


def base_configs(config: str) -> str:
    """The configuration a ``disttrain[-caller|-bf16|...]@MB/BACKEND`` one varies (bucket_cap_mb MB),
    for the command line's check; any other name as it is."""
    return re.sub(r"^(disttrain[a-z0-9-]*)@\d+(\.\d+)?/", r"\1/", config)


def all_configs(args) -> list[str]:
    """--configs, then the --peers configurations (torch-best[-bf16][@MB]/BACKEND)."""
    configs = [c for c in args.configs.split(",") if c]
    caps = [c for c in args.best_bucket_mb.split(",") if c]
    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if peer not in PEERS:
            raise SystemExit(f"disttrain bench ddp: unknown peer {peer!r}; choose from {', '.join(PEERS)}")
        for wrapper in PEERS[peer]:
            for cap in caps:
                name = f"{wrapper}@{cap}" if len(caps) > 1 else wrapper
                configs += [f"{name}/{backend}" for backend in args.best_backends.split(",") if backend]
    return configs


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


def _bf16_compress_hook(process_group, bucket):
    """PyTorch's ``default_hooks.bf16_compress_hook``, called unchanged: ``register_comm_hook``
    refuses that hook by its name unless CUDA with NCCL 2.10+ (or XPU) is present, a check of the
    device and not of the hook, which runs on CPU over any backend that all-reduces bfloat16."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(process_group, bucket)


class _Runner:
    """One configuration: its own model replica, DDP wrapper and optimizer."""

    def __init__(self, config, model_name, args, groups, rank):
        import copy

        import torch
        from torch.nn.parallel import DistributedDataParallel as TorchDDP

        import disttrain

        self.config = config
        self.floor = config in (FLOOR, FLOOR_COPY, FLOOR_FUSED_SGD)
        self.comm_only = config == COMM_ONLY
        wrapper, backend = ("disttrain", "disttrain") if self.floor or self.comm_only else config.split("/")
        self.group = groups[backend]
        torch.manual_seed(0)
        model, self.x, self.y = _model_and_batch(model_name, args, rank)
        self.model = copy.deepcopy(model)
        kwargs = dict(gradient_as_bucket_view=args.gradient_as_bucket_view)
        if wrapper == "torch":
            self.ddp = TorchDDP(self.model, process_group=self.group, **kwargs)
        elif wrapper.startswith("torch-best"):
            bucket_mb = float(wrapper.split("@")[1]) if "@" in wrapper else float(args.best_bucket_mb.split(",")[0])
            self.ddp = TorchDDP(self.model, process_group=self.group, gradient_as_bucket_view=True,
                                static_graph=True, bucket_cap_mb=bucket_mb)
            if "-bf16" in wrapper:
                self.ddp.register_comm_hook(self.group, _bf16_compress_hook)
        else:
            wrapper, _, cap = wrapper.partition("@")  # disttrain[-caller|-bf16][@MB]: bucket_cap_mb
            if cap:
                kwargs["bucket_cap_mb"] = float(cap)
            compression = "bf16" if wrapper.endswith("bf16") else None
            if wrapper.endswith("caller"):  # each bucket as it becomes ready: several buckets
                kwargs.update(reduce_on_caller=True, overlap=True)
            elif wrapper.endswith("handoff"):
                kwargs.update(reduce_on_caller=False, overlap=True)
            elif wrapper.endswith("overlap"):
                kwargs["overlap"] = True
            self.ddp = disttrain.DistributedDataParallel(self.model, process_group=self.group,
                                                         compression=compression, **kwargs)
        self.ours = not wrapper.startswith("torch")
        torch_fused = config == FLOOR_FUSED_SGD or wrapper.endswith("torchfused")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, **(
            {"fused": True} if torch_fused else {}))
        if wrapper.endswith("-fused"):
            self.ddp.fuse_optimizer(self.opt)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU time of the whole process (all its threads) per step
        self.comm_us = self.hidden_us = 0.0
        self.last_step: list = []  # the last timed step's trace events
        if config == FLOOR_COPY:
            # Each gradient copied once as soon as it is accumulated (the hook runs on backward's thread).
            def copy_hook(param, copy):
                copy.copy_(param.grad)

            for p in self.model.parameters():
                p.register_post_accumulate_grad_hook(functools.partial(copy_hook, copy=torch.empty_like(p)))
        if self.comm_only:
            # Gradients to reduce (one local backward), grouped as the reducer's buckets.
            with self.ddp.no_sync():
                torch.nn.functional.cross_entropy(self.ddp(self.x), self.y).backward()
            by_name = dict(self.model.named_parameters())
            self.buckets = [[by_name[n].grad for n in bucket] for bucket in self.ddp.bucket_plan()]

    def step(self) -> None:
        import contextlib

        import torch.nn.functional as F

        from disttrain import trace
        from disttrain._parallel import average_coalesced

        if self.comm_only:
            for work in [average_coalesced(self.group, bucket) for bucket in self.buckets]:
                work.wait()
            return
        self.opt.zero_grad()
        with trace.span("forward"), self.ddp.no_sync() if self.floor else contextlib.nullcontext():
            loss = F.cross_entropy(self.ddp(self.x), self.y)
        with trace.span("loss.backward()"):
            loss.backward()
        with trace.span("optimizer.step()"):
            self.opt.step()

    def timed_step(self) -> None:
        import torch.distributed as dist

        from disttrain import trace

        dist.barrier(group=self.group)
        trace.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.step()
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)
        trace.stop()
        self.last_step = trace.collect()
        if self.ours and not self.floor:
            total, hidden = trace.hidden(self.last_step)
            self.comm_us += total
            self.hidden_us += hidden

    def steps_per_s(self, times: list[float] | None = None) -> float:
        """1 / median step time, each step timed by its slowest rank."""
        import torch
        import torch.distributed as dist

        slowest = torch.tensor(self.times if times is None else times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self.group)
        return 1.0 / statistics.median(slowest.tolist())


def bench_rank(args) -> None:
    import gc

    import torch
    import torch.distributed as dist

    import disttrain

    torch.set_num_threads(1)
    disttrain.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {"disttrain": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    configs = all_configs(args)
    for name, options in GROUP_OPTIONS.items():
        if any(c.endswith("/" + name) for c in configs):
            groups[name] = dist.new_group(backend="disttrain", pg_options=options)
    rows = []
    for model_name in [m for m in args.models.split(",") if m]:
        runners = [_Runner(c, model_name, args, groups, rank) for c in configs]
        for runner in runners:
            for _ in range(args.warmup):
                runner.step()
        # Configurations take turns step by step, so load from elsewhere on
        # the machine falls on all of them alike, in a new order each turn (the
        # same on every rank: a fixed seed), so that none always follows the same
        # one (in a fixed order, two identical configurations differed by 0.03-0.07
        # x floor, the second faster in both runs).
        order = random.Random(model_name)
        for _ in range(args.rounds * args.steps):
            for runner in order.sample(runners, len(runners)):
                runner.timed_step()
        params = sum(p.numel() for p in runners[0].model.parameters())
        for runner in runners:
            rows.append({
                "model": model_name, "world_size": world, "config": runner.config, "params": params,
                "steps_per_s": runner.steps_per_s(),
                # The same from the processes' CPU time (compute and progress threads): what
                # the step costs the cores, whatever else runs on the machine.
                "cpu_steps_per_s": runner.steps_per_s(runner.cpu_times),
                "hidden_fraction": (runner.hidden_us / runner.comm_us) if runner.comm_us else "",
            })
            if args.trace:
                _write_trace(args.trace, f"ddp-{model_name}-{world}r-{runner.config.replace('/', '-')}",
                             runner.last_step, rank, world)
        del runners
        gc.collect()
    if rank == 0 and args.rows_file:
        with open(args.rows_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _write_trace(folder, name, events, rank, world) -> None:
    """Rank 0 writes ``events`` of every rank as folder/name.json and draws them to folder/name.png."""
    import torch.distributed as dist

    from disttrain import trace

    parts: list = [None] * world
    dist.all_gather_object(parts, events)
    if rank != 0:
        return
    merged = [e for part in parts for e in part]
    os.makedirs(folder, exist_ok=True)
    trace.write(os.path.join(folder, name + ".json"), merged)
    try:
        trace.plot(merged, os.path.join(folder, name + ".png"), title=name)
    except ImportError:
        print("# matplotlib is not installed: no picture of the trace", file=sys.stderr)


def _report(rows, out) -> None:
    def rate(model, world, config, column="steps_per_s"):
        for r in rows:
            if (r["model"], r["world_size"], r["config"]) == (model, world, config):
                return r[column]
        return None

    for r in rows:
        gloo = rate(r["model"], r["world_size"], "torch/gloo")
        ours_backend = rate(r["model"], r["world_size"], "torch/disttrain")
        floor = rate(r["model"], r["world_size"], FLOOR)
        comm_only = r["config"] == COMM_ONLY
        r["vs_torch_gloo"] = r["steps_per_s"] / gloo if gloo and not comm_only else ""
        r["vs_torch_disttrain"] = r["steps_per_s"] / ours_backend if ours_backend and not comm_only else ""
        torch_rates = [t["steps_per_s"] for t in rows if (t["model"], t["world_size"]) == (r["model"], r["world_size"])
                       and t["config"].startswith("torch")]
        r["best_torch_config"] = next((t["config"] for t in rows if (t["model"], t["world_size"]) == (
            r["model"], r["world_size"]) and t["config"].startswith("torch") and t["steps_per_s"] == max(torch_rates)),
            "") if torch_rates else ""
        r["vs_best_torch"] = r["steps_per_s"] / max(torch_rates) if torch_rates and not comm_only else ""
        # Step time as a multiple of the no-communication step's (1.00 = the floor); for
        # comm-only, floor + communication over floor: the step if no communication were hidden.
        r["x_floor"] = (floor / r["steps_per_s"] + (1 if comm_only else 0)) if floor else ""
        cpu_floor = rate(r["model"], r["world_size"], FLOOR, "cpu_steps_per_s")
        r["cpu_x_floor"] = (cpu_floor / r["cpu_steps_per_s"] + (1 if comm_only else 0)) if cpu_floor else ""
    print(f"{'model':<11} {'ranks':>5} {'config':<28} {'steps/s':>8} {'x floor':>7} {'cpu x floor':>11} "
          f"{'vs torch/gloo':>13} {'vs torch/disttrain':>18} {'vs best torch':>13} {'hidden':>7}")
    for r in rows:
        print(f"{r['model']:<11} {r['world_size']:>5} {r['config']:<28} {r['steps_per_s']:>8.3f} "
              f"{format_or_dash(r['x_floor'], '>7.2f')} {format_or_dash(r['cpu_x_floor'], '>11.2f')} "
              f"{format_or_dash(r['vs_torch_gloo'], '>13.2f')} {format_or_dash(r['vs_torch_disttrain'], '>18.2f')} "
              f"{format_or_dash(r['vs_best_torch'], '>13.2f')} "
              f"{format_or_dash(r['hidden_fraction'], '>7.2f')}")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    return per_world_size_main("ddp", argv, build_parser, bench_rank, _report, lambda args: f"{args.models} x {args.configs}")


if __name__ == "__main__":
    sys.exit(main())
