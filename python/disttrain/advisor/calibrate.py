"""``disttrain advise --calibrate``: the advisor's time model on this machine,
measured rather than fitted (issue 21).

Refitting the time model on one short run of ``disttrain train`` on a CPU was
tried and is not reliable: the family's speed correction is shrunk towards
its nominal start, so a 2-epoch run of 0.15-0.18 s per epoch was predicted at
2.2-2.6 s, and a copy of it made 10 times slower was once predicted faster.
So a device the logs do not hold (this CPU, or a GPU outside the table) is
measured directly: a few training steps of a configuration, the same loop as
the trainer's epoch (a fresh DataLoader with the configuration's workers over
the data set, to(device), forward and backward through disttrain's DDP wrapper
in a one-process group, SGD step, the loss and accuracy read back, and the
trainer's one-flag all-reduce per step: without the wrapper and the flag a
small CNN's step measured 27-28 ms against 37-48 ms with them), timed step by
step after a warm-up, and scaled to an epoch:

    epoch = first batch (loader start, workers included) + samples / batch x step

with ``step`` the mean time from one full batch's end to the next (the next
batch's loading included; the mean, not the median: an epoch is the sum of its
steps, and on a shared machine a few steps take several times the others),
measured for at least a second, and ``samples`` the data set's training split
(features.TRAIN_SAMPLES; one process: multi-process runs are not calibrated).
The interval is the spread of an epoch's mean step (the steps' standard
deviation over the square root of an epoch's steps, times 1.28), widened to at
least ``DRIFT`` either way: a run later on the same machine meets another
load, which no measurement made now can know (an a-priori width, not
calibrated).

``--calibrate`` measures the reference steps (``REFERENCE``: the trainer's
default small CNN on its digits data set, and ResNet-18 on CIFAR-10-shaped
tensors) and places the device on the logs' speed scale (ResNet-18, batch 4,
against the fitted time model's compute and launch terms for a data-sheet
GPU: an equivalent FP32 TFLOPS figure). A prediction for a configuration the
calibration lacks measures that configuration then (seconds) and adds it.
The result is kept as JSON (no pickle) in the advisor's cache folder, one
file per device, and reused until the next ``--calibrate``.

Unlike the rest of the advisor, this module needs torch (imported when a
measurement runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._atomic import write_atomically
from .errors import AdvisorInputError
from .features import TRAIN_SAMPLES

# (model, data set, batch): ResNet-18 at batch 4, a few seconds on a CPU (batch 32 took 13 s a step on 2 busy cores).
REFERENCE = (("small_cnn", "digits", 32), ("small_cnn", "digits", 128), ("resnet18", "cifar10", 4))
# A priori: a later run on the same machine may meet another load; the interval is at least this wide either way.
DRIFT = 0.15
_SPEED_REFERENCE = REFERENCE[2]


@dataclass
class Calibration:
    """Measured training steps on one device of this machine."""

    device: str                      # 'cpu' or the CUDA device's name
    host: str
    threads: int
    timings: list = field(default_factory=list)  # one dict per (model, dataset, batch, workers)
    equivalent_tflops: float | None = None
    created: float = 0.0

    def timing(self, model: str, dataset: str, batch: int, workers: int) -> dict | None:
        for t in self.timings:
            if (t["model_name"], t["dataset"], t["batch_size"], t["workers"]) == (model, dataset, batch, workers):
                return t
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def _path(device: str) -> Path | None:
    from .cache import cache_dir

    folder = cache_dir()
    return None if folder is None else folder / f"calibration-{_slug(platform.node())}-{_slug(device)}.json"


def this_device(device: str | None = None) -> str:
    """The device a measurement runs on: ``device`` ('cpu' or 'cuda'), else CUDA when available."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise AdvisorInputError(f"--device {device}: give cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdvisorInputError("--device cuda: no CUDA device here")
    return device


def device_name(device: str) -> str:
    """The name the trainer writes into metrics.csv's ``gpu`` column for ``device``."""
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def load(device: str) -> Calibration | None:
    """The stored calibration of ``device`` ('cpu' or a CUDA name), or None."""
    path = _path(device)
    if path is None:
        return None
    try:
        with open(path) as f:
            return Calibration(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def store(calibration: Calibration) -> Path | None:
    """Writes the calibration as JSON (atomically) into the cache folder; None when the cache is off."""
    from .cache import _private_dir

    path = _path(calibration.device)
    if path is None or not _private_dir(path.parent):
        return None
    try:
        write_atomically(path, lambda f: json.dump(asdict(calibration), f, indent=1), durable=False)
    except OSError:
        return None
    return path


def _model_and_data(model_name: str, dataset: str):
    """The trainer's model and training set for a configuration (CIFAR-10: random tensors of its shape)."""
    import torch

    from .. import data
    from ..train_cli import build_model

    if dataset == "digits":
        train_set, num_classes, shape = data.get_dataset("digits", None, True)
    elif dataset == "cifar10":
        generator = torch.Generator().manual_seed(0)
        train_set = torch.utils.data.TensorDataset(torch.randn(2048, 3, 32, 32, generator=generator),
                                                   torch.randint(0, 10, (2048,), generator=generator))
        num_classes, shape = 10, (3, 32, 32)
    else:
        raise AdvisorInputError(f"cannot calibrate on data set '{dataset}' (digits, cifar10)")
    try:
        return build_model(model_name, num_classes, shape), train_set
    except ValueError as e:
        raise AdvisorInputError(str(e)) from None


def measure_steps(model_name: str, dataset: str, batch_size: int, workers: int = 0, device: str = "cpu",
                  min_seconds: float = 1.0, min_steps: int = 5, max_steps: int = 400, warmup: int = 2) -> dict:
    """Times training steps of one configuration, as the trainer's epoch runs them.

    Returns:
        dict: the configuration, ``step_s`` (mean of the full-batch steps),
        ``step_s_sd`` (their standard deviation),
        ``first_batch_s`` (a fresh loader's first batch: its start and workers)
        and ``steps`` (how many were timed).
    """
    with _one_process_group():
        return _measure_steps(model_name, dataset, batch_size, workers, device, min_seconds, min_steps, max_steps,
                              warmup)


@contextlib.contextmanager
def _one_process_group():
    """A process group of this process alone (the trainer's, for a one-process run), unless one exists."""
    import torch.distributed as dist

    from ..distributed import BACKEND_NAME

    if dist.is_initialized():
        yield
        return
    # A file store in a private folder: no port, and nothing of a launcher's environment read or set.
    with tempfile.TemporaryDirectory(prefix="disttrain-calibrate-") as folder:
        dist.init_process_group(BACKEND_NAME, store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0,
                                world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _measure_steps(model_name: str, dataset: str, batch_size: int, workers: int, device: str, min_seconds: float,
                   min_steps: int, max_steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from ..ddp import DistributedDataParallel

    torch.manual_seed(0)
    module, train_set = _model_and_data(model_name, dataset)
    module = module.to(device)
    model = DistributedDataParallel(module)
    model.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps: list[float] = []
    first: list[float] = []
    seen = 0
    begin = time.perf_counter()
    while len(steps) < max_steps and (len(steps) < min_steps or time.perf_counter() - begin < min_seconds):
        loader = DataLoader(train_set, batch_size=batch_size, sampler=torch.randperm(len(train_set)).tolist(),
                            num_workers=workers, drop_last=False)
        last = time.perf_counter()
        for i, (inputs, labels) in enumerate(loader):
            if i == 0:
                first.append(time.perf_counter() - last)
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            output = model(inputs)
            loss = loss_fn(output, labels)
            loss.backward()
            optimizer.step()
            loss.item()
            int((output.argmax(1) == labels).sum())
            flag = torch.zeros(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the trainer's stop flag, agreed every step
            flag.item()
            now = time.perf_counter()
            seen += 1
            if i > 0 and len(labels) == batch_size and seen > warmup:
                steps.append(now - last)
            last = now
            if len(steps) >= max_steps or (len(steps) >= min_steps and now - begin >= min_seconds):
                break
    if not steps:
        raise AdvisorInputError(f"calibration of {model_name} on {dataset}, batch {batch_size}: the data set has "
                                f"too few samples for two full batches")
    values = np.asarray(steps)
    return {"model_name": model_name, "dataset": dataset, "batch_size": int(batch_size), "workers": int(workers),
            "step_s": float(values.mean()), "step_s_sd": float(values.std()), "first_batch_s": float(np.median(first)),
            "steps": len(values)}


def epoch_time(timing: dict, samples: float) -> tuple[float, float, float]:
    """(epoch, low, high) seconds of an epoch of ``samples`` samples from a step timing."""
    steps = samples / timing["batch_size"]
    center = timing["first_batch_s"] + steps * timing["step_s"]
    spread = max(DRIFT, 1.28 * timing["step_s_sd"] / np.sqrt(max(steps, 1.0)) / timing["step_s"])
    return center, center * (1 - min(spread, 0.9)), center * (1 + spread)


def calibrate(device: str | None = None, reference=REFERENCE, speed_scale=None) -> Calibration:
    """Measures the reference steps on ``device`` (default: CUDA if available, else the CPU).

    Args:
        speed_scale: optional ``f(model, batch) -> seconds of the compute term per
            epoch at 1 TFLOPS`` (the fitted time model's), to express the
            device as equivalent data-sheet TFLOPS.
    """
    import torch

    device = this_device(device)
    calibration = Calibration(device=device_name(device), host=platform.node(), threads=torch.get_num_threads(),
                              created=time.time())
    for model_name, dataset, batch in reference:
        few = dict(min_steps=3, warmup=1) if model_name.startswith("resnet") else {}
        calibration.timings.append(measure_steps(model_name, dataset, batch, 0, device, **few))
    speed = calibration.timing(*_SPEED_REFERENCE, 0)
    if speed_scale is not None and speed is not None:
        measured = TRAIN_SAMPLES["cifar10"] / speed["batch_size"] * speed["step_s"]
        calibration.equivalent_tflops = float(speed_scale(_SPEED_REFERENCE[0], speed["batch_size"]) / measured)
    return calibration


def predict(calibration: Calibration, configs: pd.DataFrame, measure: bool = True) -> pd.DataFrame:
    """Epoch times of configurations on the calibrated device, one row each.

    Each configuration needs ``model_name``, ``batch_size``; ``dataset``
    (default cifar10), ``num_workers_data_loader`` (default 0), ``num_of_gpus``
    (1; more is refused: the calibration times one process). A configuration
    the calibration lacks is measured now when ``measure`` (and added to it).

    Returns:
        DataFrame with ``epoch_time_s``, ``epoch_time_s_low``, ``epoch_time_s_high``.
    """
    rows = []
    for _, config in configs.iterrows():
        model = str(config["model_name"]).strip().lower()
        dataset = re.sub(r"[^a-z0-9]", "", str(config.get("dataset", "cifar10") or "cifar10").lower()) or "cifar10"
        gpus = config.get("num_of_gpus", 1)
        if pd.notna(gpus) and int(gpus) > 1:
            raise AdvisorInputError(f"{model} on {int(gpus)} processes: a calibration times one process")
        workers = config.get("num_workers_data_loader", 0)
        workers = 0 if pd.isna(workers) else int(workers)
        batch = int(config["batch_size"])
        if dataset not in TRAIN_SAMPLES:
            raise AdvisorInputError(f"unknown data set '{dataset}' (known: {', '.join(TRAIN_SAMPLES)})")
        timing = calibration.timing(model, dataset, batch, workers)
        if timing is None:
            if not measure:
                raise AdvisorInputError(f"the calibration lacks {model} on {dataset}, batch {batch}, {workers} workers")
            device = "cpu" if calibration.device == "cpu" else "cuda"
            timing = measure_steps(model, dataset, batch, workers, device)
            calibration.timings.append(timing)
        center, low, high = epoch_time(timing, TRAIN_SAMPLES[dataset])
        rows.append({"epoch_time_s": center, "epoch_time_s_low": low, "epoch_time_s_high": high})
    return pd.DataFrame(rows, index=configs.index)
