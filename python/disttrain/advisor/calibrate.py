"""``disttrain advise --calibrate``: the advisor's time model on this machine,
measured rather than fitted (issue 21).

Refitting the time model on one short run of ``disttrain train`` on a CPU was
tried and is not reliable: the family's speed correction is shrunk towards
its nominal start, so a 2-epoch run of 0.15-0.18 s per epoch was predicted at
2.2-2.6 s, and a copy of it made 10 times slower was once predicted faster.
So a device the logs do not hold (this CPU, or a GPU outside the table) is
measured directly, with the trainer itself: a ``Trainer`` (one-process
group, its DDP wrapper, sampler, DataLoader with the configuration's workers,
per-step metrics and stop flag, deterministic algorithms, the snapshot and
best model written in the background after each epoch, the evaluation
between epochs) runs epochs of the configuration's data set, cut to a few
full batches (``timed_batches``) plus its last, partial batch, or all of it
when it is that small (the trainer's digits); one epoch warms up, then at
least two and a second are timed, each as the trainer's ``epoch_time``
counts it. An epoch of the whole data set is then

    epoch = timed epoch + (full batches - timed full batches) x step

with ``step`` the mean time from one full batch's end to the next while no
snapshot is being written (the next batch's loading included; the mean, not
the median: an epoch is the sum of its steps, and on a shared machine a few
steps take several times the others), and the data set's size from
features.TRAIN_SAMPLES (one process: multi-process runs are not calibrated).
An earlier hand-written copy of the trainer's loop (the same calls, timed
step by step, ``first batch + samples / batch x step``) predicted 23-27%
short of the trainer's epochs on a quiet machine with torch's 2 threads:
interleaved with a run (issue 21, docs/advisor.md), its median ratio was
0.83 against 1.02 for this measurement; in one process, step by step, the
two loops' steps agreed within 3% (the snapshot ~3%, deterministic
algorithms ~2%, the partial batch, counted as 0.23 of a step, cost 0.6 of
one), so the rest of that gap was not located in the loop: timing the
trainer itself removes the question. The interval is the spread of an
epoch's mean step (the steps' standard
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
# The same for a measurement of several processes. Each group of rank processes runs at a speed of its
# own: on this repository's 2-core machine, quiet (30 Nov 2026), 2-rank runs of the small CNN took
# 0.055-0.101 s per epoch from one group to the next, steady within each, and a measurement is one
# such group. Ten prediction/run pairs gave ratios 0.67-1.88 (log sd 0.29); this width holds 8 of
# them (chosen on those ten: post-selection).
DRIFT_RANKS = 0.35
# 2: epochs timed through the trainer itself (1, the earlier hand-written loop, predicted 23-27% short of the
# trainer's epochs; its files are not reused).
VERSION = 2
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
    version: int = 1                 # files written before VERSION 2 lack it

    def timing(self, model: str, dataset: str, batch: int, workers: int, processes: int = 1) -> dict | None:
        for t in self.timings:
            if (t["model_name"], t["dataset"], t["batch_size"], t["workers"], t.get("processes", 1)) == \
                    (model, dataset, batch, workers, processes):
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
            calibration = Calibration(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if calibration.version != VERSION or not isinstance(calibration.timings, list) \
            or not all(_valid_timing(t) for t in calibration.timings):
        return None  # a foreign or damaged file (it crashed --predict): measured again, as if absent
    return calibration


# A stored measurement's keys and, for the numbers, their kind.
_TIMING_KEYS = {"model_name": str, "dataset": str, "batch_size": int, "workers": int, "epoch_s": float,
                "timed_batches": int, "step_s": float, "step_s_sd": float}


def _valid_timing(timing) -> bool:
    """Whether a stored measurement has what epoch_time and Calibration.timing read, with sane values."""
    if not isinstance(timing, dict):
        return False
    for key, kind in _TIMING_KEYS.items():
        value = timing.get(key)
        if kind is str:
            if not isinstance(value, str):
                return False
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
                or (kind is int and value != int(value)):
            return False
    processes = timing.get("processes", 1)
    return (timing["batch_size"] >= 1 and timing["workers"] >= 0 and timing["epoch_s"] > 0
            and timing["timed_batches"] >= 0 and timing["step_s"] >= 0 and timing["step_s_sd"] >= 0
            and not isinstance(processes, bool) and isinstance(processes, int) and processes >= 1)


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


def store_added(calibration: Calibration) -> Path | None:
    """Stores ``calibration`` after this process added measurements to it, keeping those another
    process stored meanwhile under the same calibration (two --predict runs measuring at once each
    held an older copy of the file, and the last to store lost the other's); a --calibrate since
    then starts afresh."""
    latest = load(calibration.device)
    if latest is not None and latest.created == calibration.created:
        for t in latest.timings:
            if calibration.timing(t["model_name"], t["dataset"], t["batch_size"], t["workers"],
                                  t.get("processes", 1)) is None:
                calibration.timings.append(t)
    return store(calibration)


def _model_and_data(model_name: str, dataset: str):
    """The trainer's model, training set and a validation set for a configuration (CIFAR-10: random
    tensors of its shape; the validation set is a few batches, evaluated between epochs as the trainer
    does, outside the epoch's time)."""
    import torch

    from .. import data
    from ..train_cli import build_model

    if dataset == "digits":
        train_set, num_classes, shape = data.get_dataset("digits", None, True)
        val_set, _, _ = data.get_dataset("digits", None, False)
    elif dataset == "cifar10":
        generator = torch.Generator().manual_seed(0)
        train_set = torch.utils.data.TensorDataset(torch.randn(2048, 3, 32, 32, generator=generator),
                                                   torch.randint(0, 10, (2048,), generator=generator))
        val_set = torch.utils.data.Subset(train_set, range(64))
        num_classes, shape = 10, (3, 32, 32)
    else:
        raise AdvisorInputError(f"cannot calibrate on data set '{dataset}' (digits, cifar10)")
    try:
        return build_model(model_name, num_classes, shape), train_set, val_set
    except ValueError as e:
        raise AdvisorInputError(str(e)) from None


def timed_batches(model_name: str) -> int:
    """Full batches in the epochs a measurement times: a ResNet's CPU step takes seconds."""
    return 3 if model_name.startswith("resnet") else 16


def measure_steps(model_name: str, dataset: str, batch_size: int, workers: int = 0, device: str = "cpu",
                  min_seconds: float = 1.0, min_epochs: int = 2, max_epochs: int = 50,
                  batches: int | None = None, processes: int = 1) -> dict:
    """Times epochs of one configuration with the trainer's own epoch (``Trainer``).

    The data set is cut to ``batches`` full batches per rank (default:
    ``timed_batches``) plus the configuration's last, partial batch, all of it
    when it has fewer; one epoch warms up, then at least ``min_epochs`` epochs
    and ``min_seconds`` are timed. With ``processes`` > 1 (CPU only) the
    trainer runs as that many ranks, as ``disttrain train --nproc-per-node``
    starts them (processes of their own, one thread each unless
    ``OMP_NUM_THREADS`` says otherwise, the data set split among them, DDP
    over the disttrain backend), and rank 0's epochs are timed.

    Returns:
        dict: the configuration; ``epoch_s`` (the median timed epoch of the cut
        data set, as the trainer's ``epoch_time`` counts it), ``timed_batches``
        (its full batches), ``step_s`` (the mean time from one full batch's end
        to the next, while no snapshot is being written, when there are such
        steps), ``step_s_sd`` (their standard deviation), ``first_batch_s``
        (the loader's start and first step), ``steps`` and ``epochs`` (how many
        were timed), ``cpu_wait_share`` (the process's run-queue wait per second of
        timed epoch: near 0 on an idle machine; None where Linux's schedstat is
        not available), ``processes``.
    """
    if dataset not in TRAIN_SAMPLES:
        raise AdvisorInputError(f"unknown data set '{dataset}' (known: {', '.join(TRAIN_SAMPLES)})")
    if processes < 1 or (processes > 1 and device != "cpu"):
        raise AdvisorInputError(f"{processes} processes on {device}: a calibration times one process on a GPU, "
                                "one or more on the CPU")
    args = (model_name, dataset, batch_size, workers, device, min_seconds, min_epochs, max_epochs,
            timed_batches(model_name) if batches is None else batches)
    if processes > 1:
        return _measure_ranks(args, processes)
    with _one_process_group(), _trainer_side_effects_undone(device):
        return _measure_steps(*args)


# A rank of a multi-process measurement that has not finished after this long has hung (a peer died
# before a collective): the process group's timeout, and the whole measurement's.
_RANK_TIMEOUT_S = 300.0


def _measure_ranks(args: tuple, processes: int) -> dict:
    """measure_steps with ``processes`` ranks: spawned processes (one thread each unless
    OMP_NUM_THREADS is set, as torchrun starts them) in a group of their own; rank 0's timing."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from .._processes import describe_exit, start_single_threaded, stop

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="disttrain-calibrate-") as folder:
        procs = [context.Process(target=_rank_main, args=(rank, processes, folder, args), daemon=True)
                 for rank in range(processes)]
        started: list = []
        try:
            for p in procs:
                if "OMP_NUM_THREADS" in os.environ:
                    p.start()
                else:
                    start_single_threaded([p])
                started.append(p)
            # Until all have exited, or one failed (its peers may wait for it in a collective), or the deadline.
            deadline = time.monotonic() + _RANK_TIMEOUT_S + 60
            running = list(procs)
            while running and time.monotonic() < deadline:
                wait([p.sentinel for p in running], timeout=max(deadline - time.monotonic(), 0.1))
                if any(p.exitcode not in (None, 0) for p in running):
                    break
                running = [p for p in running if p.exitcode is None]
            hung = bool(running) and all(p.exitcode in (None, 0) for p in procs)
        finally:
            stop(started, terminate=True)  # a process that failed to start is not joined
        if hung:
            raise AdvisorInputError(f"measuring {args[0]} on {processes} processes: not done after "
                                    f"{_RANK_TIMEOUT_S + 60:.0f} s")
        for rank, p in sorted(enumerate(procs), key=lambda rp: not Path(folder, f"rank{rp[0]}.err").exists()):
            if p.exitcode != 0:  # the rank that reported an error first, not one stopped because of it
                error = Path(folder, f"rank{rank}.err")
                why = error.read_text().strip().splitlines()[-1] if error.exists() else f"it {describe_exit(p.exitcode)}"
                raise AdvisorInputError(f"measuring {args[0]} on {processes} processes: rank {rank} failed: {why}")
        with open(Path(folder, "rank0.json")) as f:
            return json.load(f)


def _rank_main(rank: int, world: int, folder: str, args: tuple) -> None:
    """One rank of _measure_ranks (a spawned process): its timing (rank 0) or its error into ``folder``."""
    import datetime
    import traceback

    import torch.distributed as dist

    from ..distributed import BACKEND_NAME

    try:
        dist.init_process_group(BACKEND_NAME, store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=_RANK_TIMEOUT_S))
        try:
            with _trainer_side_effects_undone(args[4]):
                timing = _measure_steps(*args)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            write_atomically(Path(folder, "rank0.json"), lambda f: json.dump(timing, f), durable=False)
    except BaseException as e:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc() + (str(e) if isinstance(e, AdvisorInputError) else f"{type(e).__name__}: {e}")
                    + "\n")
        raise SystemExit(1) from None


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


@contextlib.contextmanager
def _trainer_side_effects_undone(device: str):
    """The trainer seeds every generator, turns on deterministic algorithms and prints its epochs:
    undone afterwards, printing into nothing (--json prints on stdout). On a CUDA machine a CPU
    measurement hides CUDA from the trainer, which otherwise takes the GPU."""
    import io
    from unittest import mock

    import torch

    from ..trainer import _rng_state, _set_rng_state

    rng = _rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    hide_cuda = mock.patch.object(torch.cuda, "is_available", lambda: False) if device == "cpu" \
        else contextlib.nullcontext()
    try:
        with hide_cuda, contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        _set_rng_state(rng)


def _timed_trainer_class():
    from ..trainer import Trainer

    class _TimedTrainer(Trainer):
        """The trainer, with the end of every step stamped (its progress line's hook, called once a
        step, after the step's ``epoch_time`` is updated), and whether a snapshot was being written."""

        stamps: list

        def _progress(self) -> None:
            writing = bool((self._snapshotter is not None and self._snapshotter.busy)
                           or (self._best_writer is not None and self._best_writer.busy))
            self.stamps.append((self.epoch, self.batches_done, time.perf_counter(), self._partial["elapsed"],
                                writing))

    return _TimedTrainer


def _measure_steps(model_name: str, dataset: str, batch_size: int, workers: int, device: str, min_seconds: float,
                   min_epochs: int, max_epochs: int, batches: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.utils.data import Subset

    from ..trainer import TrainerConfig

    world = dist.get_world_size()
    full, rest = divmod(per_rank(TRAIN_SAMPLES[dataset], world), batch_size)
    kept = min(full, max(1, batches))
    torch.manual_seed(0)
    module, train_set, val_set = _model_and_data(model_name, dataset)
    # The evaluation between epochs lies outside the timed epochs: one of its batches (the trainer
    # evaluates at twice the batch size) keeps its place in the loop; the whole digits validation set
    # took about a third of a calibration's time.
    if len(val_set) > 2 * batch_size:
        val_set = Subset(val_set, range(2 * batch_size))
    # Each rank's share: the configuration's last batch, partial or not, is timed too.
    size = world * (kept * batch_size + rest)
    if size != len(train_set):
        train_set = Subset(train_set, [i % len(train_set) for i in range(size)])
    # As `disttrain train` builds it (its defaults: lr 0.05, momentum 0.9, weight decay 1e-4).
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    with tempfile.TemporaryDirectory(prefix="disttrain-calibrate-") as folder:
        config = TrainerConfig(epochs=max_epochs, batch_size=batch_size, num_workers=workers, save_location=folder,
                               save_name="calibration", progress=False, resume=False)
        trainer = _timed_trainer_class()(module, optimizer, train_set, val_set, config)
        trainer.stamps = []
        waited = []  # (run-queue wait, wall) of each timed epoch
        begin = time.perf_counter()
        try:
            # The trainer's fit() loop (an epoch, then its evaluation, metrics.csv and snapshot in the
            # background), without resume or signals; the first epoch warms up.
            while _another_epoch(trainer.epoch < 1 + min_epochs or (time.perf_counter() - begin < min_seconds
                                                                     and trainer.epoch < max_epochs), world):
                before, start = scheduler_threads(), time.perf_counter()
                trainer._train_epoch()
                spent = scheduler_delta(before, scheduler_threads())
                if trainer.epoch >= 1 and spent is not None:
                    waited.append((spent[1], time.perf_counter() - start))
                trainer._end_epoch(None)
        finally:
            for writer in (trainer._snapshotter, trainer._best_writer):
                if writer is not None:
                    writer.wait()
    epochs = trainer.history["epoch_time"][1:]
    steps, quiet, first = [], [], []
    for (e0, _, t0, _, busy0), (e1, b1, t1, elapsed, busy1) in zip(trainer.stamps, trainer.stamps[1:]):
        if e1 >= 1 and b1 == 1:
            first.append(elapsed)
        if e0 == e1 >= 1 and b1 <= kept:  # a full batch of a timed epoch, from the previous one's end
            steps.append(t1 - t0)
            if not (busy0 or busy1):
                quiet.append(t1 - t0)
    values = np.asarray(quiet if len(quiet) >= 3 else steps) if steps else np.asarray(epochs)
    return {"model_name": model_name, "dataset": dataset, "batch_size": int(batch_size), "workers": int(workers),
            "epoch_s": float(np.median(epochs)), "timed_batches": int(kept), "step_s": float(values.mean()),
            "step_s_sd": float(values.std()), "first_batch_s": float(np.median(first)), "steps": len(values),
            "epochs": len(epochs), "processes": int(world),
            "cpu_wait_share": float(sum(w for w, _ in waited) / sum(t for _, t in waited)) if waited else None}


def _another_epoch(wanted: bool, world: int) -> bool:
    """Whether any rank wants another epoch: they all run as many (each epoch holds collectives)."""
    if world == 1:
        return wanted
    from .._parallel import any_rank

    return any_rank(wanted)


def max_processes() -> int:
    """The most ranks a measurement starts on this host: twice its cores, at least 4 (each rank is a
    process with torch and the model; more would measure swapping, not training)."""
    return max(4, 2 * (os.cpu_count() or 1))


def per_rank(samples: float, processes: int) -> int:
    """A rank's samples per epoch when ``processes`` ranks split ``samples`` (the trainer's sampler: ceil)."""
    return -(-int(samples) // max(int(processes), 1))


def scheduler_threads(pid: int | str = "self") -> dict[str, tuple[float, float]] | None:
    """Per thread of a process: (CPU seconds run, seconds spent runnable but waiting for a CPU), from
    Linux's /proc/PID/task/*/schedstat; None where the kernel does not provide them. On a shared
    machine the wait is what makes the same work take longer: a measurement made while the run
    queue was long predicts a run that meets the same queue."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out = {}
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
            out[task] = (int(fields[0]) / 1e9, int(fields[1]) / 1e9)
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return out


def scheduler_delta(before: dict | None, after: dict | None) -> tuple[float, float] | None:
    """(CPU seconds, wait seconds) of a process's threads between two scheduler_threads() readings:
    a thread started meanwhile counts from zero, one that ended meanwhile is left out (its
    cumulative figures vanish with it)."""
    if before is None or after is None:
        return None
    run = sum(r - before.get(t, (0.0, 0.0))[0] for t, (r, _) in after.items())
    wait = sum(w - before.get(t, (0.0, 0.0))[1] for t, (_, w) in after.items())
    return run, wait


def epoch_time(timing: dict, samples: float) -> tuple[float, float, float]:
    """(epoch, low, high) seconds of an epoch of ``samples`` samples (split among the measurement's
    processes) from a measurement: the timed epoch, plus the full batches it lacked at the mean step."""
    full = per_rank(samples, timing.get("processes", 1)) // timing["batch_size"]
    center = timing["epoch_s"] + max(full - timing["timed_batches"], 0) * timing["step_s"]
    steps = max(full, 1)
    drift = DRIFT if timing.get("processes", 1) == 1 else DRIFT_RANKS
    spread = max(drift, 1.28 * timing["step_s_sd"] / np.sqrt(steps) / max(timing["step_s"], 1e-12))
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
                              created=time.time(), version=VERSION)
    for model_name, dataset, batch in reference:
        calibration.timings.append(measure_steps(model_name, dataset, batch, 0, device))
    speed = calibration.timing(*_SPEED_REFERENCE, 0)
    if speed_scale is not None and speed is not None:
        measured = TRAIN_SAMPLES["cifar10"] / speed["batch_size"] * speed["step_s"]
        calibration.equivalent_tflops = float(speed_scale(_SPEED_REFERENCE[0], speed["batch_size"]) / measured)
    return calibration


def _count(config, column: str, low: int, default: int | None) -> int:
    """A configuration's whole-number column (an empty cell: ``default``): a batch of 0 or 'abc' was a
    traceback from the measurement, one of 128.5 or 1.5 processes was read as 128 or 1."""
    from .loading import count_error, whole_counts

    value = config.get(column, default)
    if default is not None and pd.isna(value):
        return default
    number = pd.to_numeric(pd.Series([value]), errors="coerce")
    if not whole_counts(number, low).iloc[0]:
        raise AdvisorInputError(count_error(column, value, low))
    return int(number.iloc[0])


def predict(calibration: Calibration, configs: pd.DataFrame, measure: bool = True) -> pd.DataFrame:
    """Epoch times of configurations on the calibrated device, one row each.

    Each configuration needs ``model_name``, ``batch_size``; ``dataset``
    (default cifar10), ``num_workers_data_loader`` (default 0), ``num_of_gpus``
    (1: one process; more on a CPU: that many processes, the data split among them; more on a GPU
    is refused, the calibration times one). A configuration
    the calibration lacks is measured now when ``measure`` (and added to it).

    Returns:
        DataFrame with ``epoch_time_s``, ``epoch_time_s_low``, ``epoch_time_s_high``.
    """
    rows = []
    for _, config in configs.iterrows():
        model = str(config["model_name"]).strip().lower()
        named = config.get("dataset", "cifar10")
        named = "cifar10" if pd.isna(named) else str(named)  # an empty cell is CIFAR-10, as loading reads it
        dataset = re.sub(r"[^a-z0-9]", "", named.lower()) or "cifar10"
        processes = _count(config, "num_of_gpus", 1, 1)
        if processes > 1 and calibration.device != "cpu":
            raise AdvisorInputError(f"{model} on {processes} GPUs: a calibration times one GPU")
        nodes = _count(config, "num_of_nodes", 1, 1)
        if nodes > 1:
            raise AdvisorInputError(f"{model} on {nodes} hosts: a calibration measures this host only")
        if processes > max_processes():
            raise AdvisorInputError(f"{model} on {processes} processes: a calibration starts at most "
                                    f"{max_processes()} on this host ({os.cpu_count()} cores)")
        workers = _count(config, "num_workers_data_loader", 0, 0)
        batch = _count(config, "batch_size", 1, None)
        if dataset not in TRAIN_SAMPLES:
            raise AdvisorInputError(f"unknown data set '{dataset}' (known: {', '.join(TRAIN_SAMPLES)})")
        timing = calibration.timing(model, dataset, batch, workers, processes)
        if timing is None:
            if not measure:
                raise AdvisorInputError(f"the calibration lacks {model} on {dataset}, batch {batch}, {workers} workers, "
                                        f"{processes} process(es)")
            device = "cpu" if calibration.device == "cpu" else "cuda"
            timing = measure_steps(model, dataset, batch, workers, device, processes=processes)
            calibration.timings.append(timing)
        center, low, high = epoch_time(timing, TRAIN_SAMPLES[dataset])
        rows.append({"epoch_time_s": center, "epoch_time_s_low": low, "epoch_time_s_high": high})
    return pd.DataFrame(rows, index=configs.index)
