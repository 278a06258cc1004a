"""Sharded training: memory and speed of ZeRO stages 1-3 against DDP and
PyTorch's FSDP2 (``fully_shard``).

    disttrain bench fsdp                       # ~105 M-parameter GPT, Adam, 2 and 4 ranks
    disttrain bench fsdp --ranks 2 --layers 4  # smaller, quicker

Each world size is one job (started with torchrun). In it, every
configuration trains the same model on the same data, one after another:

    ddp/disttrain       disttrain.DistributedDataParallel (gradient_as_bucket_view: no gradient copy)
    zero1/disttrain     disttrain.FullyShardedDataParallel(stage=1) + ShardedOptimizer
    zero2/disttrain     stage 2
    zero3/disttrain     stage 3 (prefetch on; backward prefetch "post", the default)
    zero3pre/disttrain  stage 3, backward prefetch "pre" (more overlap, one more unit gathered)
    zero3/gloo          stage 3 over gloo: same transport as torch FSDP2
    fsdp2/gloo          torch.distributed.fsdp.fully_shard over gloo (CPU)

The model: a GPT (vocabulary 8192, width 768, 13 pre-norm blocks, 12 heads,
MLP 4x, untied head: 104.7 M parameters), batch 1 x 32 tokens per rank,
Adam, fp32. Units, for ours and FSDP2 alike: each block, the token
embedding, the head (as torchtitan wraps its models), and the root with
the rest (learned positions, last norm). The largest unit is a block
(7.09 M parameters, 27 MiB).

Memory: peak bytes of CPU tensor memory per rank, counted at the allocator by
``disttrain._C.TensorMemoryTracker`` (it takes the profiler's memory-reporting
slot on the training thread, so every tensor allocated and freed there is
counted, whoever allocates it: parameters, gradients, optimizer state,
gathered buffers, communication staging on that thread, activations). The
count starts before the model is built; the peak is reset after the wrapper
and optimizer exist (construction transients excluded) and taken over the
warm-up and timed steps, i.e. with the optimizer state allocated. Maximum over
ranks. Formulas (fp32, P parameters, N ranks, bytes):

    ddp     16 P                       parameters 4P + gradients 4P + Adam 8P
    zero1   8 P + 12 P / N             full parameters and gradients; master shard + Adam sharded
    zero2   4 P + 16 P / N             full parameters; gradient, master shard and Adam sharded
    zero3   16 P / N                   all sharded, plus the gathered units

The checks printed: zero3 peak <= ddp peak / N + 2 x the largest unit's full
parameters (the issue's bound), and for every row peak - formula (what is not
model state: activations, the gathered and in-flight unit buffers).

Speed: steps per second (1 / median step time, each step timed by its slowest
rank) and the ratio to ddp and to fsdp2. Rank threads are 1 (2 cores).
Rank 0 writes ``benchmarks/results/fsdp.csv``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

from disttrain.bench import format_or_dash, per_world_size_main, write_csv

CONFIGS = ("ddp/disttrain", "zero1/disttrain", "zero2/disttrain", "zero3/disttrain", "zero3pre/disttrain",
           "zero3/gloo", "fsdp2/gloo")
_MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench fsdp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="world sizes, comma separated (default 2,4)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run (default all)")
    p.add_argument("--layers", type=int, default=13, help="transformer blocks (default 13: 104.7 M parameters)")
    p.add_argument("--dim", type=int, default=768, help="model width (default 768)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sample (default 32)")
    p.add_argument("--batch", type=int, default=1, help="samples per rank (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "fsdp.csv"), help="CSV path")
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)  # worker -> launcher
    return p


def gpt_classes(vocab: int, dim: int, layers: int, seq: int, heads: int | None = None, qkv_bias: bool = True):
    """(GPT, Block): a pre-norm GPT (learned positions, untied head) and its block class."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
            self.proj = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.out(torch.nn.functional.gelu(self.fc(self.norm2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(seq, dim))
            self.blocks = nn.ModuleList(Block(dim, heads or max(1, dim // 64)) for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, x):
            h = self.embed(x) + self.pos[: x.shape[1]]
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    return GPT, Block


def _run_config(config, args, groups, rank, world):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import disttrain

    kind, backend = config.split("/")
    group = groups[backend]
    GPT, Block = gpt_classes(args.vocab, args.dim, args.layers, args.seq)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)

    tracker = disttrain._C.TensorMemoryTracker()
    tracker.start()
    try:
        torch.manual_seed(0)
        model = GPT()
        params = sum(p.numel() for p in model.parameters())
        # Units: each block, the embedding, the head (as torchtitan wraps a
        # GPT), and the root with what is left (positions, last norm).
        wrapped_modules = [*model.blocks, model.embed, model.head]
        unit_params = [sum(p.numel() for p in m.parameters()) for m in wrapped_modules]
        unit_params.append(params - sum(unit_params))  # the root
        if kind == "ddp":
            wrapped = disttrain.DistributedDataParallel(model, process_group=group, gradient_as_bucket_view=True)
            opt = torch.optim.Adam(wrapped.parameters(), lr=1e-4)
        elif kind.startswith("zero"):
            chosen = {id(m) for m in wrapped_modules}
            wrapped = disttrain.FullyShardedDataParallel(model, stage=int(kind[4]), process_group=group,
                                                         auto_wrap=lambda m: id(m) in chosen,
                                                         backward_prefetch="pre" if kind.endswith("pre") else "post")
            engine_units = sorted(wrapped._engine.unit(i).total_numel for i in range(wrapped._engine.num_units))
            assert engine_units == sorted(unit_params), (engine_units, unit_params)  # the bound uses these
            opt = disttrain.ShardedOptimizer(torch.optim.Adam, wrapped, lr=1e-4)
        elif kind == "fsdp2":
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.fsdp import fully_shard
            mesh = DeviceMesh.from_group(group, "cpu")
            for m in wrapped_modules:
                fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        else:
            raise ValueError(f"unknown configuration {config!r}")
        del model
        gc.collect()
        tracker.reset_peak()
        times = []
        for step in range(args.warmup + args.steps):
            dist.barrier(group=group)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = wrapped(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            opt.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            del out
        peak = tracker.peak_bytes
    finally:
        tracker.stop()
    stats = torch.tensor([float(peak)] + times, dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    del wrapped, opt
    gc.collect()
    return {"world_size": world, "config": config, "params": params, "largest_unit_params": max(unit_params),
            "peak_mib": stats[0].item() / _MIB, "steps_per_s": 1.0 / statistics.median(stats[1:].tolist())}


def bench_rank(args) -> None:
    import torch
    import torch.distributed as dist

    import disttrain

    torch.set_num_threads(1)
    disttrain.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {"disttrain": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        try:
            rows.append(_run_config(config, args, groups, rank, world))
        except Exception as e:  # FSDP2 may not run on every torch build's CPU path
            if not config.startswith("fsdp2"):
                raise
            if rank == 0:
                print(f"# {config} did not run: {type(e).__name__}: {e}", flush=True)
        if rank == 0:
            print(f"# {world} ranks {config}: done", flush=True)
    if rank == 0 and args.rows_file:
        with open(args.rows_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _formula_bytes(kind: str, params: int, world: int) -> float:
    p = float(params)
    return {"ddp": 16 * p, "zero1": 8 * p + 12 * p / world, "zero2": 4 * p + 16 * p / world,
            "zero3": 16 * p / world}.get(kind, 16 * p / world)  # fsdp2: fully sharded like zero3


def _report(rows, out) -> None:
    def find(world, config):
        return next((r for r in rows if (r["world_size"], r["config"]) == (world, config)), None)

    for r in rows:
        kind = r["config"].split("/")[0]
        world = r["world_size"]
        ddp, fsdp2 = find(world, "ddp/disttrain"), find(world, "fsdp2/gloo")
        r["formula_mib"] = _formula_bytes(kind[:5], r["params"], world) / _MIB
        r["peak_minus_formula_mib"] = r["peak_mib"] - r["formula_mib"]
        r["mem_vs_ddp"] = r["peak_mib"] / ddp["peak_mib"] if ddp else ""
        r["speed_vs_ddp"] = r["steps_per_s"] / ddp["steps_per_s"] if ddp else ""
        r["speed_vs_fsdp2"] = r["steps_per_s"] / fsdp2["steps_per_s"] if fsdp2 else ""
        if kind.startswith("zero3") and ddp:
            bound = ddp["peak_mib"] / world + 2 * 4 * r["largest_unit_params"] / _MIB
            r["zero3_bound_mib"] = bound
            r["zero3_bound_met"] = r["peak_mib"] <= bound
        else:
            r["zero3_bound_mib"] = r["zero3_bound_met"] = ""

    print(f"{'ranks':>5} {'config':<16} {'params':>8} {'peak MiB':>9} {'formula':>8} {'peak-form':>9} "
          f"{'mem/ddp':>7} {'steps/s':>8} {'vs ddp':>6} {'vs fsdp2':>8}")
    for r in rows:
        print(f"{r['world_size']:>5} {r['config']:<16} {r['params'] / 1e6:>7.1f}M {r['peak_mib']:>9.0f} "
              f"{r['formula_mib']:>8.0f} {r['peak_minus_formula_mib']:>9.0f} {format_or_dash(r['mem_vs_ddp'], '>7.2f')} "
              f"{r['steps_per_s']:>8.3f} {format_or_dash(r['speed_vs_ddp'], '>6.2f')} {format_or_dash(r['speed_vs_fsdp2'], '>8.2f')}")
    for r in rows:
        if r["zero3_bound_mib"] != "":
            print(f"# {r['world_size']} ranks {r['config']}: peak {r['peak_mib']:.0f} MiB "
                  f"{'<=' if r['zero3_bound_met'] else '>'} ddp/N + 2 x largest unit = {r['zero3_bound_mib']:.0f} MiB "
                  f"({'met' if r['zero3_bound_met'] else 'NOT MET'})")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    return per_world_size_main("fsdp", argv, build_parser, bench_rank, _report, lambda args: args.configs)


if __name__ == "__main__":
    sys.exit(main())
