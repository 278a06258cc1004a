"""Rank side of the multi-host test: started by torchrun inside a network
namespace (one namespace = one host). Writes one JSON result per rank."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import disttrain
from disttrain._atomic import write_atomically


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    disttrain.init(timeout=20)
    rank, world = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    result = {"rank": rank, "world": world,
              "transport": dist.group.WORLD._get_backend(torch.device("cpu")).transport}
    try:
        if mode == "kill":
            # Host 1's launcher is killed by the test once every rank is here.
            open(os.path.join(out_dir, f"ready_{rank}"), "w").close()
            start = time.monotonic()
            for _ in range(100_000):
                op_start = time.monotonic()
                dist.all_reduce(torch.ones(1 << 16))
            result["error"] = None
        else:
            mismatches = []
            for n in (0, 1, 1001, 1 << 20):
                for op in ("SUM", "MAX"):
                    t = torch.arange(n, dtype=torch.float32) % 7 + rank
                    g = t.clone()
                    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                    dist.all_reduce(g, op=getattr(dist.ReduceOp, op), group=gloo)
                    if not torch.equal(t, g):
                        mismatches.append(f"all_reduce {op} n={n}")
                t = torch.full((n,), float(rank))
                dist.broadcast(t, src=world - 1)
                if not torch.equal(t, torch.full((n,), float(world - 1))):
                    mismatches.append(f"broadcast n={n}")
                out = torch.empty(n * world)
                dist.all_gather_into_tensor(out, torch.full((n,), float(rank)))
                if not torch.equal(out, torch.arange(world, dtype=torch.float32).repeat_interleave(n)):
                    mismatches.append(f"all_gather n={n}")
                rs = torch.empty(n)
                dist.reduce_scatter_tensor(rs, torch.arange(world, dtype=torch.float32).repeat_interleave(n))
                if not torch.equal(rs, torch.full((n,), float(rank * world))):
                    mismatches.append(f"reduce_scatter n={n}")
            dist.barrier()
            result["mismatches"] = mismatches
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["error"] = str(e)
        result["op_seconds"] = time.monotonic() - op_start
    # Written whole, then renamed into place: the test polls for these files and must never read
    # one half written (a JSONDecodeError once, in a fresh-clone run under load).
    write_atomically(os.path.join(out_dir, f"rank_{rank}.json"), lambda f: json.dump(result, f), durable=False)
    if "error" not in result or result["error"] is None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
