"""MPI-style training and pipelined evaluation: disttrain against the mpi4py recipe and torch DDP.

    disttrain bench mpi                          # 2 and 4 ranks, ResNet-18 (torchvision stem) and an MLP
    disttrain bench mpi --ranks 2 --models mlp --rounds 5

Each world size is one ``mpiexec`` job (Open MPI, ``--oversubscribe``). In it the
same model, data and optimizer are trained three ways, taking turns round by
round so that all see the same machine:

    mpi4py            the recipe HPC users write: after backward, comm.Allreduce of
                      each gradient through numpy (p.grad.numpy(), a new output
                      array, / size, torch.from_numpy), then optimizer.step()
    torch-ddp/gloo    torch.nn.parallel.DistributedDataParallel over gloo
    disttrain-mpi     disttrain.strategies.mpi.GradientAverager over the disttrain
                      backend: its zero_grad, then one coalesced all-reduce (AVG)
                      per step, in place; backward's large blocks reused from the
                      step before (step memory, docs/mpi.md); the same optimizer
    disttrain-mpi-overlap  the same with GradientAverager(overlap=True): buckets
                      all-reduced from gradient hooks while backward runs
    no-comm           the floor: disttrain-mpi's step without its all-reduce (each
                      rank trains alone). No data-parallel step can be faster, so
                      no-comm / mpi4py is the best ratio to the recipe possible on
                      this machine in this run (the report's "ceiling"): where
                      compute dominates the recipe's step (ResNet-18 at batch 8
                      on one core per rank), it lies not far above 1x

Steps per second = timed steps / the slowest rank's time for them, median over
rounds; every row but no-comm is checked: after the run the models' parameters agree with
disttrain-mpi's (relative 1e-4; 1e-3 for disttrain-mpi-overlap and
torch-ddp/gloo), else the benchmark fails instead of printing. The overlapped
buckets, and gloo's ring at 4 ranks, sum the ranks' gradients in another order
(gloo at 4 ranks was once 2.08e-4 off), and the warm-up and timed steps (SGD with momentum)
amplify those fp32 roundings: 2.3e-4 was seen between them and the single
all-reduce at 4 ranks (resnet18-tv), whose averaged gradients of one step agree
within 1.2e-7; a wrong average differs by far more.

Evaluation (``--eval-ranks``, default 4): JPEG photos-sized images (640x480,
written once into a temporary folder) are read (PIL decode), resized to 128x128
(bilinear, antialiased), normalised and classified by a small CNN (read,
resize and predict cost about the same, within 2x, on one core; normalise
little). One rank doing all four steps in a loop (the other ranks wait in a
barrier, sleeping) against ``disttrain.strategies.mpi.pipeline`` with one stage
per rank (``--transfer``: how items move, sendrecv and broadcast by default, a
row each); outputs are compared, and each round takes its turn: one rank, then
each pipeline.
Rank 0 writes ``benchmarks/results/mpi.csv``.

Thread budget, the same for every configuration and rank: each process runs
with OMP_NUM_THREADS=1 (torch's intra-op pool of 1 thread), as MPI jobs do with
one process per core. So the one-rank evaluation computes on one thread; the
pipeline's ranks each compute on one thread, and share the machine's cores
(4 ranks on a 2-core machine: oversubscribed). Per image both do the same
work: the same four functions on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from disttrain.bench import arguments, format_or_dash, write_csv

TRAIN_CONFIGS = ("mpi4py", "torch-ddp/gloo", "disttrain-mpi", "disttrain-mpi-overlap", "no-comm")
MPIEXEC = ("mpiexec", "--oversubscribe", "--allow-run-as-root")

MODELS = ("resnet18-tv", "mlp")  # --models


def check_args(args: argparse.Namespace, backends: list[str]) -> None:
    """The command line's check before a job starts (ValueError, one line): the transfers, and the
    pipeline's ranks on this host."""
    from disttrain.cli import check_ranks

    transfers = [t.strip() for t in args.transfer.split(",") if t.strip()]
    if not transfers or any(t not in ("broadcast", "sendrecv") for t in transfers):
        raise ValueError(f"--transfer {args.transfer!r}: give broadcast, sendrecv or both, comma separated")
    check_ranks("--eval-ranks", args.eval_ranks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench mpi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="training world sizes, comma separated (default 2,4)")
    p.add_argument("--models", default="resnet18-tv,mlp",
                   help="resnet18-tv (ResNet-18, torchvision's stem, 32x32 images), mlp (default both)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (default 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--eval-ranks", type=int, default=4, help="pipeline ranks (default 4; 0 skips the evaluation)")
    p.add_argument("--images", type=int, default=160, help="evaluation images (default 160)")
    p.add_argument("--eval-rounds", type=int, default=3, help="evaluation rounds (default 3)")
    p.add_argument("--eval-size", type=int, default=128, help="images are resized to this square (default 128)")
    p.add_argument("--queue-depth", type=int, default=4, help="pipeline credits per edge (default 4)")
    p.add_argument("--transfer", default="sendrecv,broadcast",
                   help="how the pipeline moves items between ranks, one pipeline row each, comma separated: "
                        "sendrecv (isend/recv, TCP; the library's default), broadcast (shared memory on one host) (default both; "
                        "docs/mpi.md)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "mpi.csv"), help="CSV path")
    p.add_argument("--role", choices=("train", "eval"), default=None, help=argparse.SUPPRESS)  # inside a job
    p.add_argument("--image-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    return p


# --- training ----------------------------------------------------------------------------------

def _model(name: str):
    from disttrain import models

    if name == "resnet18-tv":
        return models.resnet18(num_classes=10, stem="imagenet")
    if name == "mlp":
        return models.mlp(num_classes=10, in_features=3 * 32 * 32, hidden=3072, depth=2)
    raise SystemExit(f"disttrain bench mpi: unknown model '{name}'; choose resnet18-tv or mlp")


def _train_rank(args) -> list[dict]:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from mpi4py import MPI

    import disttrain
    from disttrain.strategies import mpi

    rank, world = disttrain.init()
    comm = MPI.COMM_WORLD
    gloo = dist.new_group(backend="gloo")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        base = _model(name)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(args.batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        nets = {c: _model(name) for c in TRAIN_CONFIGS}
        for net in nets.values():
            net.load_state_dict(base.state_dict())
        opts = {c: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for c, n in nets.items()}
        ddp = torch.nn.parallel.DistributedDataParallel(nets["torch-ddp/gloo"], process_group=gloo)
        average = mpi.GradientAverager(nets["disttrain-mpi"])
        overlapped = mpi.GradientAverager(nets["disttrain-mpi-overlap"], overlap=True)
        alone = mpi.GradientAverager(nets["no-comm"])

        def mpi4py_step() -> None:
            net, opt = nets["mpi4py"], opts["mpi4py"]
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            for p in net.parameters():
                grad = p.grad.numpy()
                total = np.empty_like(grad)
                comm.Allreduce(grad, total, op=MPI.SUM)
                p.grad = torch.from_numpy(total / world)
            opt.step()

        def ddp_step() -> None:
            opts["torch-ddp/gloo"].zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opts["torch-ddp/gloo"].step()

        def disttrain_step() -> None:
            average.zero_grad()
            F.cross_entropy(nets["disttrain-mpi"](x), y).backward()
            average()
            opts["disttrain-mpi"].step()

        def overlap_step() -> None:
            overlapped.zero_grad()
            F.cross_entropy(nets["disttrain-mpi-overlap"](x), y).backward()
            overlapped()
            opts["disttrain-mpi-overlap"].step()

        def floor_step() -> None:
            # disttrain_step less its all-reduce: the same step-memory scope, closed where it would be.
            alone.zero_grad()
            F.cross_entropy(nets["no-comm"](x), y).backward()
            alone._close_scope()
            opts["no-comm"].step()

        steps = {"mpi4py": mpi4py_step, "torch-ddp/gloo": ddp_step, "disttrain-mpi": disttrain_step,
                 "disttrain-mpi-overlap": overlap_step, "no-comm": floor_step}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        rates: dict[str, list[float]] = {c: [] for c in TRAIN_CONFIGS}
        for _ in range(args.rounds):
            for config, step in steps.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                rates[config].append(args.steps / float(elapsed))
        reference = torch.cat([p.detach().reshape(-1) for p in nets["disttrain-mpi"].parameters()])
        for config in TRAIN_CONFIGS:
            if config == "no-comm":  # each rank trained on its own data alone
                continue
            got = torch.cat([p.detach().reshape(-1) for p in nets[config].parameters()])
            error = float((got - reference).abs().max() / reference.abs().max())
            # The overlapped buckets, and gloo's ring at more than 2 ranks, sum in another order,
            # which the momentum steps amplify (the help).
            if error > (1e-3 if config in ("disttrain-mpi-overlap", "torch-ddp/gloo") else 1e-4):
                raise RuntimeError(f"bench mpi: {config} and disttrain-mpi trained {name} to different parameters "
                                   f"(max relative difference {error:.2e}); no result is printed")
        params = sum(p.numel() for p in base.parameters())
        for config in TRAIN_CONFIGS:
            rows.append({"kind": "train", "model": name, "world_size": world, "config": config,
                         "params": params, "tensors": len(list(base.parameters())), "batch": args.batch,
                         "steps_per_s": round(statistics.median(rates[config]), 3), "images_per_s": ""})
    dist.destroy_process_group()
    return rows


# --- evaluation --------------------------------------------------------------------------------

def _write_images(folder: str, count: int) -> None:
    """640x480 RGB JPEGs with photo-like content (gradients, shapes, noise), 4 classes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(count):
        folder_i = os.path.join(folder, f"class{i % 4}")
        os.makedirs(folder_i, exist_ok=True)
        phase = rng.uniform(0, 6.28, 3)
        pixels = np.stack([127 + 100 * np.sin(xx / (40 + 10 * c) + yy / (60 + 7 * c) + phase[c]) for c in range(3)],
                          -1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            draw.ellipse((x0, y0, x0 + int(rng.integers(20, 80)), y0 + int(rng.integers(20, 80))),
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(os.path.join(folder_i, f"{i:05d}.jpg"), quality=90)


def _eval_stages(size: int):
    import torch
    import torch.nn.functional as F

    from disttrain import models
    from disttrain.strategies import mpi

    torch.manual_seed(0)
    model = models.get_model("small_cnn", num_classes=4, in_channels=3).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255

    def read(entry):
        return mpi.read_image(entry[0])

    def resize(image):
        return F.interpolate(image.float()[None], size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]

    def normalise(image):
        return (image - mean) / std

    def predict(image):
        with torch.no_grad():
            return model(image[None])[0]

    return [("read", read), ("resize", resize), ("normalise", normalise), ("predict", predict)]


def _eval_rank(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    import disttrain
    from disttrain.strategies import mpi

    rank, world = disttrain.init()
    stages = _eval_stages(args.eval_size)
    files = mpi.image_files(args.image_dir) if rank == 0 else []
    transfers = [t for t in args.transfer.split(",") if t]
    if not transfers or any(t not in ("broadcast", "sendrecv") for t in transfers):
        raise SystemExit(f"disttrain bench mpi: --transfer {args.transfer!r}: give broadcast, sendrecv or both")
    serial_rates: list[float] = []
    pipeline_rates: dict[str, list[float]] = {t: [] for t in transfers}
    reports: dict[str, str] = {}
    for _ in range(args.eval_rounds):
        dist.barrier()
        if rank == 0:
            start = time.perf_counter()
            serial: list[torch.Tensor] = []
            for entry in files:
                value: Any = entry
                for _, fn in stages:
                    value = fn(value)
                serial.append(value)
            serial_rates.append(len(files) / (time.perf_counter() - start))
        for transfer in transfers:
            dist.barrier()
            start = time.perf_counter()
            result = mpi.pipeline(stages, files, queue_depth=args.queue_depth, transfer=transfer)
            elapsed = time.perf_counter() - start
            if rank == 0:
                assert result.outputs is not None
                if (not all(torch.equal(a, b) for a, b in zip(result.outputs, serial))
                        or len(result.outputs) != len(files)):
                    raise RuntimeError("bench mpi: the pipeline's outputs differ from the serial evaluation's")
                pipeline_rates[transfer].append(len(files) / elapsed)
                reports[transfer] = result.report()
    rows = []
    if rank == 0:
        for transfer in transfers:
            print(f"# pipeline ({transfer}) per-stage statistics (last round):\n" + reports[transfer], flush=True)
        configs: list[tuple[str, int, list[float]]] = [("one rank", 1, serial_rates)]
        configs += [(f"pipeline ({world} ranks)" + ("" if t == "sendrecv" else f", {t}"), world, pipeline_rates[t])
                    for t in transfers]
        for config, ranks, rates in configs:
            rows.append({"kind": "eval", "model": f"small_cnn@{args.eval_size}x{args.eval_size}", "world_size": ranks, "config": config,
                         "params": "", "tensors": "", "batch": 1, "steps_per_s": "",
                         "images_per_s": round(statistics.median(rates), 1)})
    dist.destroy_process_group()
    return rows


# --- launcher ----------------------------------------------------------------------------------

def _run_job(world: int, argv: list[str], label: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = os.path.join(tmp, "rows.json")
        cmd = [*MPIEXEC, "-n", str(world), sys.executable, "-m", "disttrain.bench.mpi", *argv,
               "--rows-file", rows_file]
        print(f"# {world} ranks: {label}", flush=True)
        load_before = os.getloadavg()[0]
        subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
        with open(rows_file) as f:
            rows = json.load(f)
        # The machine's load around the job (other users' processes compete for the cores too).
        load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        return [dict(row, load_1min=load) for row in rows]


def _same_run(rows: list[dict], row: dict) -> dict[str, float]:
    """Steps per second of every training configuration of ``row``'s model and world size."""
    return {r["config"]: r["steps_per_s"] for r in rows
            if r["kind"] == "train" and r["model"] == row["model"] and r["world_size"] == row["world_size"]}


def _report(rows: list[dict], out: str) -> None:
    print(f"\n{'model':<14} {'ranks':>5} {'configuration':<22} {'steps/s':>8} {'vs mpi4py':>9} {'vs ddp/gloo':>11}")
    for row in rows:
        if row["kind"] != "train":
            continue
        same = _same_run(rows, row)
        print(f"{row['model']:<14} {row['world_size']:>5} {row['config']:<22} {row['steps_per_s']:>8.2f} "
              f"{row['steps_per_s'] / same['mpi4py']:>8.2f}x {row['steps_per_s'] / same['torch-ddp/gloo']:>10.2f}x")
    for row in rows:
        if row["kind"] == "train" and row["config"] == "no-comm":
            same = _same_run(rows, row)
            print(f"ceiling {row['model']} at {row['world_size']} ranks: no data-parallel step beats no-comm, "
                  f"{row['steps_per_s'] / same['mpi4py']:.2f}x the recipe in this run; disttrain-mpi reaches "
                  f"{same['disttrain-mpi'] / row['steps_per_s']:.2f} of the floor's steps/s")
    print("load average (1 min) around each job: "
          + ", ".join(sorted({f"{r['world_size']} ranks {r['kind']}: {r['load_1min']}" for r in rows})))
    evals = [r for r in rows if r["kind"] == "eval"]
    if evals:
        print(f"\n{'evaluation':<30} {'ranks':>5} {'images/s':>9} {'vs one rank':>11}")
        for row in evals:
            print(f"{row['config']:<30} {row['world_size']:>5} {format_or_dash(row['images_per_s'], '>9.1f')} "
                  f"{row['images_per_s'] / evals[0]['images_per_s']:>10.2f}x")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    argv = arguments("mpi", argv)
    args = build_parser().parse_args(argv)
    if args.role is not None:  # one rank of a job
        mine = _train_rank(args) if args.role == "train" else _eval_rank(args)
        if mine and args.rows_file:
            with open(args.rows_file, "w") as f:
                json.dump(mine, f)
        return 0
    if shutil.which("mpiexec") is None:
        print("disttrain bench mpi: mpiexec not found; install Open MPI (scripts/setup.sh: openmpi-bin)",
              file=sys.stderr)
        return 2
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("disttrain bench mpi: the mpi4py recipe needs mpi4py: pip install 'disttrain[mpi]'", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for world in [int(w) for w in args.ranks.split(",") if w]:
        rows += _run_job(world, [*argv, "--role", "train"], f"training {args.models}, {', '.join(TRAIN_CONFIGS)}")
    if args.eval_ranks:
        with tempfile.TemporaryDirectory(prefix="disttrain-bench-images-") as images:
            _write_images(images, args.images)
            rows += _run_job(args.eval_ranks, [*argv, "--role", "eval", "--image-dir", images],
                             f"evaluation of {args.images} images, one rank and the pipeline")
    _report(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
