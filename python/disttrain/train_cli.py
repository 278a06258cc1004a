"""``disttrain train``: the snapshot trainer from the command line.

Under torchrun, mpiexec/mpirun or srun every rank runs this command; without a launcher,
``--nproc-per-node N`` starts the N ranks itself through PyTorch's elastic
launcher (``python -m torch.distributed.run``), restarts included.

Every option (and every entry of a configuration file) is checked before any
rank starts: a bad value is one line on stderr naming it and what would be
accepted, and exit status 2, never a crash that a launcher would restart.

Examples::

    disttrain train -e 2 --nproc-per-node 2                      # digits, 2 ranks, one command
    torchrun --nproc-per-node 4 --max-restarts 3 -m disttrain.cli train -m resnet18 \\
        --dataset cifar10 -d ~/data/cifar10 --time-budget 1.5 -b 128 --save-name r18
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, NoReturn

_CONFIG_KEYS = {  # configuration-file key -> option; keys of ../shared/data/epoch-logs/configurations.json included
    "model_name": "model", "model": "model", "batch_size": "batch_size", "learning_rate": "learning_rate",
    "num_epochs": "epochs", "epochs": "epochs", "time_budget": "time_budget", "momentum": "momentum",
    "weight_decay": "weight_decay", "gamma": "gamma", "milestones": "milestones", "dataset": "dataset",
    "num_workers_data_loader": "num_workers", "num_workers": "num_workers", "seed": "seed",
    "lr_scaling": "lr_scaling", "save_name": "save_name",
}
# Describe the launch (nodes, GPUs, backend), which the launcher decides, not the configuration.
_LAUNCH_KEYS = {"config_index", "is_distributed", "distributed_strategy", "num_of_nodes", "num_of_gpus",
                "distribute_data"}


#: Exit status of a configuration error (as argparse's): bad input, not a crash; nothing was started.
CONFIG_ERROR_EXIT = 2

STRATEGIES = ("ddp", "fsdp", "torch_ddp", "decentralised", "none")


class ConfigError(ValueError):
    """A bad option value or configuration entry; the message names it and what is accepted."""


class DataSetError(Exception):
    """A data set whose files passed the checks before launch but cannot be used once read (a
    truncated CIFAR-10 batch, an image folder with too few images for a test split): one line."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block), as every other configuration error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="disttrain train", description="Fault-tolerant data-parallel training "
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
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="ddp: data-parallel (default); fsdp: sharded (ZeRO, see --zero-stage); torch_ddp: "
                        "PyTorch's DistributedDataParallel in place of disttrain's (the reference); decentralised: "
                        "this process is one peer of decentralised training (see --initial-peers); none: the model "
                        "unwrapped, one rank (plain non-distributed training, the serial baseline)")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=None,
                   help="with --strategy fsdp: 1 shards optimizer state, 2 also gradients, 3 also parameters (default)")
    p.add_argument("--backend", default="disttrain", help="process-group backend: disttrain (default), gloo, nccl")
    p.add_argument("--seed", type=int, default=0, help="same command and seed, same losses (default 0)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="STEPS",
                   help="also snapshot every STEPS optimizer steps (mid-epoch resume)")
    p.add_argument("--keep-snapshots", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true",
                   help="start over: delete the run folder's snapshots of an earlier run (its metrics.csv and "
                        "best_model.dts are replaced by this run's)")
    d = p.add_argument_group("decentralised peers (--strategy decentralised)")
    d.add_argument("--initial-peers", default=None, metavar="HOST:PORT,...",
                   help="peers to meet first (default: DISTTRAIN_INITIAL_PEERS; none: this peer is the first)")
    d.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="this peer's control address (default 127.0.0.1:0, any free port)")
    d.add_argument("--local-steps", type=int, default=None, metavar="H",
                   help="DiLoCo: average after H local steps (default 50 without --target-batch-size)")
    d.add_argument("--target-batch-size", type=int, default=None, metavar="B",
                   help="hivemind: average gradients once the peers together have B samples")
    d.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer learning rate (default 0.7)")
    d.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum (default 0.9)")
    d.add_argument("--min-group-size", type=int, default=2, help="fewest peers that average together (default 2)")
    d.add_argument("--wait-for-peers", type=int, default=0, metavar="N",
                   help="start training only once N other peers are seen (default 0: at once); waits at most "
                        "--timeout seconds")
    d.add_argument("--matchmaking-window", type=float, default=2.0,
                   help="seconds the leader waits for ready peers (default 2)")
    d.add_argument("--compression", choices=("none", "bf16", "int8"), default="none",
                   help="what the averaging sends (default none: float32)")
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
    child = subprocess.Popen(cmd)

    # A preemption (SIGTERM from a scheduler, `docker stop`, `timeout`) signals this process, and
    # perhaps only it: passed on to the launcher, which passes it to the ranks, so they save a
    # snapshot and exit (143) instead of training on as orphans of a launcher that died at once.
    # Ctrl-C reaches the launcher and the ranks from the terminal itself: wait for them.
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if forwarded and code != 0:  # torchrun ends a run it was signalled to stop with 1 (and a traceback)
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code


def _configurations(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[argparse.Namespace, dict]]:
    if args.configuration_file is None:
        return [(args, {})]
    try:
        with open(args.configuration_file) as f:
            entries = json.load(f)
    except OSError as e:
        raise ConfigError(f"-c/--configuration-file '{args.configuration_file}': {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"-c/--configuration-file '{args.configuration_file}' is not JSON ({e}); "
                          "expected a JSON list of objects") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"-c/--configuration-file '{args.configuration_file}' must hold a non-empty JSON list "
                          "of objects")
    runs = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - set(_CONFIG_KEYS) - _LAUNCH_KEYS
        if unknown:
            raise ConfigError(f"configuration {i} in '{args.configuration_file}' has unknown keys {sorted(unknown)}; "
                              f"known: {sorted(_CONFIG_KEYS)}")
        run = argparse.Namespace(**vars(args))
        for key, value in entry.items():
            if key in _CONFIG_KEYS:
                setattr(run, _CONFIG_KEYS[key], value)
        index = entry.get("config_index", i)
        if "save_name" not in entry:
            # Named after the file: another file's config_0 resumed this one's finished run (0 epochs
            # trained, exit 0) or, with --no-resume, replaced it.
            prefix = args.save_name or os.path.splitext(os.path.basename(args.configuration_file))[0] or "configs"
            run.save_name = f"{prefix}/config_{index}"
        if entry.get("distribute_data") is False:
            raise ConfigError(f"configuration {i} in '{args.configuration_file}': distribute_data false (every rank "
                              "trains on the whole data set) is not what disttrain train does: it splits the data "
                              "across the ranks (distribute_data true)")
        runs.append((run, {"config_index": index}))
    names = [run.save_name for run, _ in runs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        first, second = [i for i, n in enumerate(names) if n == twice][:2]
        raise ConfigError(f"configurations {first} and {second} in '{args.configuration_file}' would share the run "
                          f"folder '{twice}' (the second resumes, or replaces, the first): give each its own "
                          "config_index or save_name")
    return runs


def build_model(name: str, num_classes: int, shape: tuple[int, int, int]) -> Any:
    """The trainer's model by name for a data set's classes and (channels, height, width) samples
    (the MLP takes them flattened). Also what the advisor's calibration times."""
    from . import models

    channels, height, width = shape
    if name.lower() == "mlp":
        return models.get_model("mlp", num_classes=num_classes, in_features=channels * height * width)
    if name.lower() in _VIT_PATCH:  # a position embedding per patch: built for the data set's image size
        return models.get_model(name, num_classes=num_classes, in_channels=channels, image_size=height)
    return models.get_model(name, num_classes=num_classes, in_channels=channels)


#: Vision transformers of disttrain.models and their patch sizes: the image side must be a multiple.
_VIT_PATCH = {"vit_base_patch32_224": 32, "vit_small": 2}


def _model_and_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The run's model (initial weights from ``--seed``), SGD optimizer, training and test sets."""
    import torch

    from . import data

    torch.manual_seed(args.seed)  # the model's initial weights
    try:
        train_set, num_classes, shape = data.get_dataset(args.dataset, args.data, True, args.image_size)
        val_set, _, _ = data.get_dataset(args.dataset, args.data, False, args.image_size)
    except (ValueError, FileNotFoundError) as e:  # what data.py raises for files it cannot use
        raise DataSetError(f"-d/--data {args.data!r}: {e}") from None
    model = build_model(args.model, num_classes, shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return model, optimizer, train_set, val_set


def _train_one(args: argparse.Namespace, extra_columns: dict) -> dict:
    import torch

    from .trainer import Trainer, TrainerConfig

    model, optimizer, train_set, val_set = _model_and_data(args)
    milestones = list(args.milestones) if isinstance(args.milestones, list) else \
        [int(m) for m in str(args.milestones).split(",") if m.strip()]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, args.gamma) if milestones else None
    epochs = args.epochs if args.epochs is not None or args.time_budget is not None else 10
    config = TrainerConfig(
        epochs=epochs, time_budget_hours=args.time_budget, batch_size=args.batch_size, num_workers=args.num_workers,
        save_location=args.save_location,
        save_name=run_name(args),
        snapshot_every_steps=args.snapshot_every, keep_snapshots=args.keep_snapshots, lr_scaling=args.lr_scaling,
        seed=args.seed, backend=args.backend, timeout_seconds=args.timeout, tensorboard=args.tensorboard,
        progress=not args.no_progress, resume=not args.no_resume,
        strategy=args.strategy, zero_stage=args.zero_stage if args.zero_stage is not None else 3,
        configuration={"model_name": args.model, "dataset": args.dataset, "config_index": "", **extra_columns})
    return Trainer(model, optimizer, train_set, val_set, config, scheduler=scheduler).fit()


# --- validation: everything a rank would fail on, checked before any rank starts ------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _need_int(option: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{option} {value!r}: expected a whole number >= {minimum}"
                          + (f" and <= {maximum}" if maximum is not None else ""))


def _need_number(option: str, value: Any, minimum: float, inclusive: bool, maximum: float | None = None) -> None:
    if (not _is_number(value) or value < minimum or (value == minimum and not inclusive)
            or (maximum is not None and value > maximum)):
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        raise ConfigError(f"{option} {shown}: expected a number {'>=' if inclusive else '>'} {minimum:g}"
                          + (f" and <= {maximum:g}" if maximum is not None else ""))


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_data(dataset: str, root: Any) -> None:
    from .data import IMAGE_EXTENSIONS

    if dataset == "digits":
        return
    if not isinstance(root, str) or not root:
        raise ConfigError(f"--dataset {dataset} needs its data folder: -d/--data FOLDER")
    folder = os.path.expanduser(root)
    if not os.path.isdir(folder):
        raise ConfigError(f"-d/--data '{root}': {'not a folder' if os.path.exists(folder) else 'no such folder'}; "
                          f"--dataset {dataset} reads its files from an existing folder")
    if dataset == "cifar10":
        inner = os.path.join(folder, "cifar-10-batches-py")
        batches = inner if os.path.isdir(inner) else folder
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        missing = [n for n in names if not os.path.isfile(os.path.join(batches, n))]
        if missing:
            raise ConfigError(f"-d/--data '{root}': CIFAR-10 file(s) {', '.join(missing)} not found in '{batches}'; "
                              "expected the python-pickle batches of cifar-10-python.tar.gz (data_batch_1..5, "
                              "test_batch)")
        for name in names:  # a pickle starts with its protocol opcode (0x80); catches an HTML page, text, ...
            with open(os.path.join(batches, name), "rb") as f:
                if f.read(1) != b"\x80":
                    raise ConfigError(f"-d/--data '{root}': '{os.path.join(batches, name)}' is not a CIFAR-10 "
                                      "python-pickle batch; expected the files of cifar-10-python.tar.gz")
        return
    # imagefolder: class folders, in train/ (and test/ or val/) when there is such a split, with images.
    base = os.path.join(folder, "train") if os.path.isdir(os.path.join(folder, "train")) else folder
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not classes:
        raise ConfigError(f"-d/--data '{root}': no class folders in '{base}'; --dataset imagefolder expects "
                          "FOLDER/<class>/<image> (or FOLDER/train/<class>/<image>)")
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for c in classes for f in os.listdir(os.path.join(base, c))):
        raise ConfigError(f"-d/--data '{root}': no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                          f"of '{base}'")


def _backends() -> list[str]:
    import torch
    import torch.distributed as dist

    names = ["disttrain", "gloo"]
    if torch.cuda.is_available() and dist.is_nccl_available():
        names.append("nccl")
    if dist.is_mpi_available():
        names.append("mpi")
    return names


def run_name(args: argparse.Namespace) -> str:
    """The run's folder inside -s/--save-location: --save-name, else one named after the run's
    model, data set and batch size (a decentralised peer: its strategy)."""
    if args.save_name:
        return str(args.save_name)
    kind = "decentralised" if args.strategy == "decentralised" else f"b{args.batch_size}"
    return f"{args.model}_{args.dataset}_{kind}"


def validate(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Checks one run's options (from the command line or a configuration
    entry) before anything starts; raises :class:`ConfigError` naming the bad
    value and what would be accepted."""
    from .data import DATASETS
    from .models import MODELS

    if not isinstance(args.model, str) or args.model.lower() not in MODELS:
        raise ConfigError(f"-m/--model {args.model!r}: unknown model; choose from {', '.join(MODELS)}")
    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset {args.dataset!r}: unknown data set; choose from {', '.join(DATASETS)}")
    patch = _VIT_PATCH.get(args.model.lower())
    side = {"digits": 8, "cifar10": 32}.get(args.dataset, args.image_size)
    if patch is not None and _is_int(side) and side % patch:
        raise ConfigError(f"-m/--model {args.model!r}: cuts images into {patch}x{patch} patches, and --dataset "
                          f"{args.dataset} has {side}x{side} images; choose an image size that is a multiple of "
                          f"{patch} (--dataset imagefolder --image-size) or another model")
    _need_int("-b/--batch-size", args.batch_size, 1)
    if args.epochs is not None:
        _need_int("-e/--epochs", args.epochs, 0)
    if args.time_budget is not None:
        _need_number("--time-budget", args.time_budget, 0, inclusive=False)
    _need_number("-lr/--learning-rate", args.learning_rate, 0, inclusive=False)
    _need_number("--momentum", args.momentum, 0, inclusive=True)
    _need_number("--weight-decay", args.weight_decay, 0, inclusive=True)
    _need_number("--gamma", args.gamma, 0, inclusive=False)
    if isinstance(args.milestones, list):  # from a configuration file
        good = all(_is_int(m) and m >= 1 for m in args.milestones)
    else:
        good = all(m.strip().isdigit() and int(m) >= 1 for m in str(args.milestones).split(",") if m.strip())
    if not good:
        raise ConfigError(f"--milestones {args.milestones!r}: expected epochs >= 1, comma separated (e.g. 60,80)")
    if args.lr_scaling not in ("linear", "sqrt", "none"):
        raise ConfigError(f"--lr-scaling {args.lr_scaling!r}: choose from linear, sqrt, none")
    _need_int("--image-size", args.image_size, 1)
    _need_int("-w/--num-workers", args.num_workers, 0)
    _need_int("--seed", args.seed, 0, 2**63 - 1)  # torch's generators take 64 bits (a larger one was a traceback)
    _need_int("--snapshot-every", args.snapshot_every, 0)
    _need_int("--keep-snapshots", args.keep_snapshots, 1)
    _need_number("--timeout", args.timeout, 0, inclusive=False, maximum=1e9)  # 31 years: 1e14 overflowed timedelta
    if args.nproc_per_node is not None:
        _need_int("--nproc-per-node", args.nproc_per_node, 1)
    _need_int("--max-restarts", args.max_restarts, 0)
    if args.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {args.strategy!r}: choose from {', '.join(STRATEGIES)}")
    _check_decentralised(args)
    ranks = _job_ranks(args, environ)  # and malformed launcher variables, one line
    if args.strategy == "none":
        if ranks > 1:
            raise ConfigError(f"--strategy none: trains the model unwrapped on one rank, and the job has {ranks} ranks; "
                              "start one process (no --nproc-per-node) or choose --strategy ddp")
    if args.zero_stage is not None and args.strategy != "fsdp":
        raise ConfigError(f"--zero-stage {args.zero_stage}: applies to --strategy fsdp only (the strategy is "
                          f"{args.strategy})")
    backends = _backends()
    if args.backend not in backends:
        raise ConfigError(f"--backend {args.backend!r}: not available here; choose from {', '.join(backends)}")
    try:
        _check_data(args.dataset, args.data)
    except OSError as e:  # a folder that cannot be listed
        raise ConfigError(f"-d/--data {args.data!r}: cannot read '{e.filename}' ({e.strerror})") from None
    # The run folder: SAVE_LOCATION/SAVE_NAME, a folder that exists or can be created.
    if not isinstance(args.save_location, str) or not args.save_location:
        raise ConfigError(f"-s/--save-location {args.save_location!r}: expected a folder")
    args.save_location = os.path.expanduser(args.save_location)  # as -d is ('--save-location=~/runs' made a '~')
    if args.save_name is not None:
        name = str(args.save_name)
        if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ConfigError(f"--save-name {args.save_name!r}: expected a relative folder name inside "
                              "-s/--save-location (no '..', not absolute)")
    run_dir = os.path.join(args.save_location, run_name(args))
    existing = _nearest_existing(run_dir)
    if not os.path.isdir(existing):
        raise ConfigError(f"-s/--save-location {args.save_location!r}: '{existing}' is a file, not a folder; the run "
                          f"folder would be '{run_dir}'")
    for inner in ("snapshots", "metrics.csv", "best_model.dts"):  # what the trainer creates or replaces in it
        path = os.path.join(run_dir, inner)
        if os.path.exists(path) and os.path.isdir(path) != (inner == "snapshots"):
            raise ConfigError(f"-s/--save-location {args.save_location!r}: '{path}' is a "
                              f"{'folder' if os.path.isdir(path) else 'file'} in the run folder where the trainer "
                              f"keeps its {'snapshots folder' if inner == 'snapshots' else 'file ' + inner}; "
                              "move it away or choose another --save-name")
    try:  # what the trainer does first anyway; the only sure test that it can be done (root passes access())
        os.makedirs(run_dir, exist_ok=True)
        probe_fd, probe = tempfile.mkstemp(prefix=".disttrain-write-test-", dir=run_dir)
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"-s/--save-location {args.save_location!r}: cannot write the run folder '{run_dir}' "
                          f"({e.strerror}); expected a writable folder") from None


def _job_ranks(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """The ranks this command's job will have: the launcher's world size under one (read from
    ``environ``, default this process's), else --nproc-per-node."""
    from .distributed import launch_environment

    try:
        env = launch_environment(environ)
    except ValueError as e:  # malformed launcher variables (a stray RANK without WORLD_SIZE): was a traceback
        raise ConfigError(str(e)) from None
    if env is not None:
        return int(env["world_size"])
    return args.nproc_per_node if _is_int(args.nproc_per_node) else 1


def _check_decentralised(args: argparse.Namespace) -> None:
    options = {"--initial-peers": args.initial_peers, "--listen": args.listen, "--local-steps": args.local_steps,
               "--target-batch-size": args.target_batch_size, "--wait-for-peers": args.wait_for_peers or None}
    if args.strategy != "decentralised":
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: applies to --strategy decentralised only (the strategy is {args.strategy})")
        return
    from .strategies.decentralised import parse_peers

    if args.nproc_per_node is not None:
        raise ConfigError("--nproc-per-node: a decentralised peer is one process; start one `disttrain train "
                          "--strategy decentralised` per peer")
    # The trainer's options that a peer does not use were taken and ignored in silence.
    ignored = {"--milestones": args.milestones not in ("", []), "--gamma": args.gamma != 0.1,
               "--lr-scaling": args.lr_scaling != "linear", "--snapshot-every": args.snapshot_every != 0,
               "--keep-snapshots": args.keep_snapshots != 3, "--tensorboard": bool(args.tensorboard),
               "--backend": args.backend != "disttrain"}
    given = [name for name, changed in ignored.items() if changed]
    if given:
        raise ConfigError(f"{given[0]}: does not apply to --strategy decentralised (a peer keeps its learning rate, "
                          "snapshots after each epoch and talks to its peers over its own TCP links)")
    if args.local_steps is not None and args.target_batch_size is not None:
        raise ConfigError("--local-steps and --target-batch-size: choose one (DiLoCo or hivemind rounds)")
    if args.local_steps is not None:
        _need_int("--local-steps", args.local_steps, 1)
    else:
        args.local_steps = 50
    if args.target_batch_size is not None:
        _need_int("--target-batch-size", args.target_batch_size, 1)
    _need_number("--outer-lr", args.outer_lr, 0, inclusive=False)
    _need_number("--outer-momentum", args.outer_momentum, 0, inclusive=True)
    if args.outer_momentum >= 1:
        raise ConfigError(f"--outer-momentum {args.outer_momentum:g}: expected a number in [0, 1)")
    _need_int("--min-group-size", args.min_group_size, 1)
    _need_int("--wait-for-peers", args.wait_for_peers, 0)
    _need_number("--matchmaking-window", args.matchmaking_window, 0, inclusive=False)
    for name, value in (("--initial-peers", args.initial_peers), ("--listen", args.listen)):
        try:
            if len(parse_peers(value, allow_port_zero=name == "--listen")) > 1 and name == "--listen":
                raise ValueError("one address only")
        except ValueError as e:
            raise ConfigError(f"{name} {value!r}: {e}; expected HOST:PORT") from None


#: Exit status of a run that started and failed in a way a traceback would not explain better.
RUN_ERROR_EXIT = 1
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _run_error(message: str) -> int:
    print(f"disttrain train: error: {message}", file=sys.stderr, flush=True)
    return RUN_ERROR_EXIT


def _interrupted() -> int:
    """Ctrl-C in a rank (the terminal signals every rank): one line, where it was a traceback per rank."""
    print("disttrain train: interrupted; the run folder keeps its last complete snapshot, from which the same "
          "command resumes", file=sys.stderr, flush=True)
    return 128 + signal.SIGINT


def _config_error(message: str) -> int:
    print(f"disttrain train: error: {message}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT


def _checked_runs(argv: list[str], environ: Mapping[str, str] | None = None
                  ) -> tuple[argparse.Namespace, list[tuple[argparse.Namespace, dict]]]:
    """The parsed command and its runs, each validated; ``environ``: the launcher variables the
    runs will see (default this process's; a caller that starts them under its own torchrun
    passes those)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = _configurations(args, parser)
    for i, (run, columns) in enumerate(runs):
        try:
            validate(run, environ)
        except ConfigError as e:
            if args.configuration_file is None:
                raise
            raise ConfigError(f"configuration {columns.get('config_index', i)} in "
                              f"'{args.configuration_file}': {e}") from None
    return args, runs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, runs = _checked_runs(argv)
    except ConfigError as e:
        return _config_error(str(e))
    if args.nproc_per_node is not None and not _under_launcher():
        return _launch(argv, args)
    if args.strategy == "decentralised":
        from .strategies import decentralised

        try:
            for run, columns in runs:
                decentralised.run_from_args(run, *_model_and_data(run),
                                            {"model_name": run.model, "dataset": run.dataset, "config_index": "",
                                             **columns})
        except (decentralised.DecentralisedError, DataSetError) as e:  # a busy --listen port, another model's snapshot
            return _run_error(str(e))
        except KeyboardInterrupt:
            return _interrupted()
        return 0

    import torch.distributed as dist

    import disttrain

    from .trainer import ResumeError

    disttrain.init(backend=args.backend, timeout=args.timeout)
    try:
        for run, columns in runs:
            _train_one(run, columns)
    except (ResumeError, DataSetError) as e:  # the run folder's snapshot is of another model: one line, not a traceback
        return _run_error(str(e))
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        # A full disk, a quota, a folder gone read-only: the last snapshot that committed is intact.
        what = str(e.strerror)
        if e.filename and str(e.filename) not in what:
            what += f": '{e.filename}'"
        if "previous snapshot is untouched" not in what:
            what += "; the run folder keeps its last complete snapshot"
        return _run_error(f"{what}; the same command resumes from it once this is fixed")
    finally:
        # What still holds a group (a trainer that a reference cycle keeps alive holds its DDP,
        # which holds the group) goes now, while the interpreter is whole: a group released only
        # at finalization keeps gloo's worker threads running, and one that drops its last op then
        # aborts the process after the training is done ("terminate called without an active
        # exception", seen once in CI in the 2-rank gloo run of the scaling notebook; docs/backend.md).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
