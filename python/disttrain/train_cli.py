"""``disttrain train``: the snapshot trainer from the command line.

Under torchrun, mpiexec/mpirun or srun every rank runs this command; without a launcher,
``--nproc-per-node N`` starts the N ranks itself through PyTorch's elastic
launcher (``python -m torch.distributed.run``), restarts included.

Examples::

    disttrain train -e 2 --nproc-per-node 2                      # digits, 2 ranks, one command
    torchrun --nproc-per-node 4 --max-restarts 3 -m disttrain.cli train -m resnet18 \\
        --dataset cifar10 -d ~/data/cifar10 --time-budget 1.5 -b 128 --save-name r18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CONFIG_KEYS = {  # configuration-file key -> option; keys of ../shared/data/epoch-logs/configurations.json included
    "model_name": "model", "model": "model", "batch_size": "batch_size", "learning_rate": "learning_rate",
    "num_epochs": "epochs", "epochs": "epochs", "time_budget": "time_budget", "momentum": "momentum",
    "weight_decay": "weight_decay", "gamma": "gamma", "milestones": "milestones", "dataset": "dataset",
    "num_workers_data_loader": "num_workers", "num_workers": "num_workers", "seed": "seed",
    "lr_scaling": "lr_scaling", "save_name": "save_name",
}
# Describe the launch (nodes, GPUs, backend), which the launcher decides, not the configuration.
_LAUNCH_KEYS = {"config_index", "is_distributed", "distributed_strategy", "num_of_nodes", "num_of_gpus"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain train", description="Fault-tolerant data-parallel training "
                                "(resumes from the newest good snapshot in SAVE_LOCATION/SAVE_NAME).")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="batch size per rank (default 32)")
    p.add_argument("-e", "--epochs", type=int, default=None, help="epochs (default 10 without --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="HOURS",
                   help="stop when the next epoch would not fit in HOURS")
    p.add_argument("-lr", "--learning-rate", type=float, default=0.05,
                   help="single-process learning rate, scaled with the world size (default 0.05)")
    p.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default="linear")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=str, default="", help="epochs where the lr is multiplied by --gamma, e.g. 60,80")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("-m", "--model", default="small_cnn",
                   help="resnet18, resnet34, resnet50, resnet101, small_cnn (default), mlp")
    p.add_argument("--dataset", choices=("digits", "cifar10", "imagefolder"), default="digits",
                   help="digits: embedded, no download (default); cifar10: python-pickle batches in -d; "
                        "imagefolder: one folder per class in -d")
    p.add_argument("-d", "--data", default=None, help="data folder for cifar10 and imagefolder")
    p.add_argument("--image-size", type=int, default=32, help="imagefolder: images are resized to this square")
    p.add_argument("-w", "--num-workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("-s", "--save-location", default="runs", help="parent of the run folder (default runs)")
    p.add_argument("--save-name", default=None, help="run folder name (default MODEL_DATASET_bBATCH)")
    p.add_argument("-c", "--configuration-file", default=None,
                   help="JSON list of configurations (dicts of these options), run in turn")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: data-parallel (default); fsdp: sharded (ZeRO, see --zero-stage)")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=3,
                   help="with --strategy fsdp: 1 shards optimizer state, 2 also gradients, 3 also parameters (default)")
    p.add_argument("--backend", default="disttrain", help="process-group backend: disttrain (default), gloo, nccl")
    p.add_argument("--seed", type=int, default=0, help="same command and seed, same losses (default 0)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="STEPS",
                   help="also snapshot every STEPS optimizer steps (mid-epoch resume)")
    p.add_argument("--keep-snapshots", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true", help="ignore existing snapshots")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="without torchrun: start N ranks through torch.distributed.run")
    p.add_argument("--max-restarts", type=int, default=3, help="with --nproc-per-node: restarts after a failure")
    return p


def _under_launcher() -> bool:
    """torchrun, mpiexec/mpirun or srun started this process as one rank of a job."""
    from .distributed import launch_environment

    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ or launch_environment() is not None


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(o + "=") for o in options):
            out.append(arg)
    return out


def _launch(argv: list[str], args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           f"--max-restarts={args.max_restarts}", "-m", "disttrain.cli", "train",
           *_strip(argv, ("--nproc-per-node", "--max-restarts"))]
    print("disttrain: launching " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


def _configurations(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[argparse.Namespace, dict]]:
    if args.configuration_file is None:
        return [(args, {})]
    with open(args.configuration_file) as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SystemExit(f"disttrain train: {args.configuration_file} must hold a JSON list of objects")
    runs = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - set(_CONFIG_KEYS) - _LAUNCH_KEYS
        if unknown:
            raise SystemExit(f"disttrain train: configuration {i} has unknown keys {sorted(unknown)}; "
                             f"known: {sorted(_CONFIG_KEYS)}")
        run = argparse.Namespace(**vars(args))
        for key, value in entry.items():
            if key in _CONFIG_KEYS:
                setattr(run, _CONFIG_KEYS[key], value)
        index = entry.get("config_index", i)
        if "save_name" not in entry:
            run.save_name = f"{args.save_name or 'configs'}/config_{index}"
        runs.append((run, {"config_index": index}))
    return runs


def _train_one(args: argparse.Namespace, extra_columns: dict) -> dict:
    import torch

    from . import data, models
    from .trainer import Trainer, TrainerConfig

    torch.manual_seed(args.seed)  # the model's initial weights
    train_set, num_classes, (channels, height, width) = data.get_dataset(args.dataset, args.data, True, args.image_size)
    val_set, _, _ = data.get_dataset(args.dataset, args.data, False, args.image_size)
    if args.model.lower() == "mlp":
        model = models.get_model("mlp", num_classes=num_classes, in_features=channels * height * width)
    else:
        model = models.get_model(args.model, num_classes=num_classes, in_channels=channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    milestones = [int(m) for m in str(args.milestones).split(",") if m.strip()]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, args.gamma) if milestones else None
    epochs = args.epochs if args.epochs is not None or args.time_budget is not None else 10
    config = TrainerConfig(
        epochs=epochs, time_budget_hours=args.time_budget, batch_size=args.batch_size, num_workers=args.num_workers,
        save_location=args.save_location,
        save_name=args.save_name or f"{args.model}_{args.dataset}_b{args.batch_size}",
        snapshot_every_steps=args.snapshot_every, keep_snapshots=args.keep_snapshots, lr_scaling=args.lr_scaling,
        seed=args.seed, backend=args.backend, timeout_seconds=args.timeout, tensorboard=args.tensorboard,
        progress=not args.no_progress, resume=not args.no_resume,
        strategy=args.strategy, zero_stage=args.zero_stage,
        configuration={"model_name": args.model, "dataset": args.dataset, "config_index": "", **extra_columns})
    return Trainer(model, optimizer, train_set, val_set, config, scheduler=scheduler).fit()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nproc_per_node is not None and not _under_launcher():
        if args.nproc_per_node < 1:
            parser.error("--nproc-per-node must be at least 1")
        return _launch(argv, args)
    runs = _configurations(args, parser)

    import torch.distributed as dist

    import disttrain

    disttrain.init(backend=args.backend, timeout=args.timeout)
    try:
        for run, columns in runs:
            _train_one(run, columns)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
