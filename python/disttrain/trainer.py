"""The snapshot trainer: data-parallel training that survives kill -9.

Every rank runs the same :class:`Trainer`. Rank 0 writes snapshots in the
background (``disttrain.snapshot``); after any failure, torchrun
(``--max-restarts``) restarts the group and every rank resumes from the newest
snapshot that verifies, mid-epoch included, so a run that was interrupted ends
with exactly the parameters of one that was not (deterministic by default).

Run folder ``SAVE_LOCATION/SAVE_NAME/``::

    snapshots/step_000000420.dts   the last ``keep_snapshots`` snapshots
    best_model.dts                 model with the lowest validation loss so far
    metrics.csv                    one row per epoch (columns of the epoch logs)
    tensorboard/                   when enabled and installed
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import numbers
import os
import random
import signal
import sys
import time
import weakref
from collections.abc import Sized
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from . import snapshot
from ._parallel import any_rank, flag_tensor
from .distributed import init as init_process_group
from .fault_injection import FaultInjector
from .train_metrics import describe_run, write_metrics_csv

if TYPE_CHECKING:
    from .fsdp import FullyShardedDataParallel

log = logging.getLogger("disttrain.trainer")

_LR_SCALINGS = ("linear", "sqrt", "none")
_STRATEGIES = ("ddp", "fsdp", "torch_ddp", "none")
# fsdp: a submodule with at least this many parameters (not in a unit below it) is its own unit.
_FSDP_MIN_UNIT_PARAMS = 100_000
_STATE_FORMAT = "disttrain.trainer/1"


@dataclasses.dataclass
class TrainerConfig:
    """What a :class:`Trainer` does; every field has a working default.

    Args:
        epochs: epochs to run; with ``time_budget_hours`` too, whichever ends first.
        time_budget_hours: stop cleanly when the next epoch would not fit in the
            budget (run time accumulates across restarts).
        batch_size: per rank.
        num_workers: DataLoader worker processes per rank.
        save_location, save_name: the run folder is ``save_location/save_name``.
        snapshot_every_steps: also snapshot every N optimizer steps (mid-epoch
            resume); 0 snapshots at epoch ends only.
        keep_snapshots: how many snapshots to keep.
        lr_scaling: the optimizer's learning rate is the single-process one; it is
            multiplied by the world size (``"linear"``), its square root
            (``"sqrt"``) or left alone (``"none"``).
        seed: data order and random number generators.
        deterministic: ``torch.use_deterministic_algorithms`` (warn only).
        backend: process-group backend when the trainer creates the group.
        timeout_seconds: process-group timeout (a dead peer is an error after this).
        tensorboard: also log to ``tensorboard/`` when the package is installed.
        progress: progress line on rank 0.
        resume: resume from the newest good snapshot in the run folder.
        configuration: extra columns for metrics.csv (``model_name``, ``dataset``, ``config_index``).
        strategy: ``"ddp"`` (default: :class:`disttrain.DistributedDataParallel`),
            ``"fsdp"`` (:class:`disttrain.FullyShardedDataParallel`; the optimizer is
            rebuilt over the shards with the same class and hyperparameters) or
            ``"torch_ddp"`` (PyTorch's ``torch.nn.parallel.DistributedDataParallel``
            in place of disttrain's, everything else the same: the reference that
            ``disttrain bench scaling`` runs beside disttrain's) or ``"none"``
            (the model unwrapped: plain non-distributed training, one rank only;
            the serial baseline of ``disttrain bench scaling``).
        zero_stage: with ``"fsdp"``, the ZeRO stage (1, 2 or 3).
    """

    epochs: int | None = None
    time_budget_hours: float | None = None
    batch_size: int = 32
    num_workers: int = 0
    save_location: str = "runs"
    save_name: str = "run"
    snapshot_every_steps: int = 0
    keep_snapshots: int = 3
    lr_scaling: str = "linear"
    seed: int = 0
    deterministic: bool = True
    backend: str = "disttrain"
    timeout_seconds: float = 300.0
    tensorboard: bool = False
    progress: bool = True
    resume: bool = True
    configuration: dict = dataclasses.field(default_factory=dict)
    strategy: str = "ddp"
    zero_stage: int = 3

    def __post_init__(self):
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"TrainerConfig: strategy must be one of {_STRATEGIES}, got '{self.strategy}'")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"TrainerConfig: zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.epochs is None and self.time_budget_hours is None:
            raise ValueError("TrainerConfig: give epochs, time_budget_hours or both")
        if self.epochs is not None and (not _whole(self.epochs) or self.epochs < 0):
            raise ValueError(f"TrainerConfig: epochs must be a whole number >= 0, got {self.epochs!r}")
        # NaN compares false with everything: a NaN budget would never run out.
        if self.time_budget_hours is not None and not (math.isfinite(self.time_budget_hours)
                                                       and self.time_budget_hours > 0):
            raise ValueError(f"TrainerConfig: time_budget_hours must be a number > 0, got {self.time_budget_hours}")
        for name, minimum in (("snapshot_every_steps", 0), ("keep_snapshots", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if not _whole(value) or value < minimum:
                raise ValueError(f"TrainerConfig: {name} must be a whole number >= {minimum}, got {value!r}")
        if not (isinstance(self.timeout_seconds, numbers.Real) and math.isfinite(self.timeout_seconds)
                and self.timeout_seconds > 0):
            raise ValueError(f"TrainerConfig: timeout_seconds must be a number > 0, got {self.timeout_seconds!r}")
        if self.lr_scaling not in _LR_SCALINGS:
            raise ValueError(f"TrainerConfig: lr_scaling must be one of {_LR_SCALINGS}, got '{self.lr_scaling}'")
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"TrainerConfig: batch_size must be a whole number >= 1, got {self.batch_size!r}")


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sampler_class():
    from .sampler import DistributedSampler

    return DistributedSampler


def _ddp_class(strategy: str = "ddp"):
    if strategy == "torch_ddp":
        return torch.nn.parallel.DistributedDataParallel
    from .ddp import DistributedDataParallel

    return DistributedDataParallel


class _ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r + W, r + 2W, ...: every sample exactly once
    (DistributedSampler would pad with repeats and skew the metrics)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _Preempted(Exception):
    pass


class ResumeError(ValueError):
    """The run folder's newest snapshot does not fit this trainer (another model or
    optimizer); the message is one line naming the snapshot and what differs."""


def _state_mismatch(saved: Any, current: dict[str, Any]) -> str | None:
    """What differs between a snapshot's model state and the model's (None: it fits)."""
    if not isinstance(saved, dict):
        return "it holds no model state dict"
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [k for k in current if k in saved and isinstance(saved[k], torch.Tensor)
              and isinstance(current[k], torch.Tensor) and tuple(saved[k].shape) != tuple(current[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's entries missing (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} entries the model lacks (e.g. '{unexpected[0]}')")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. '{k}': {list(saved[k].shape)} in the snapshot, "
                     f"{list(current[k].shape)} in the model)")
    return ", ".join(parts) or None


def _lr_factor(scaling: str, world_size: int) -> float:
    return {"linear": float(world_size), "sqrt": math.sqrt(world_size), "none": 1.0}[scaling]


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Data-parallel training with snapshots, resume and metrics.

    Args:
        model: the model, identical on every rank (build it after seeding).
        optimizer: its optimizer, with the single-process learning rate.
        train_set: training data set (indexable, yields ``(input, label)``).
        val_set: validation data set, or None.
        config: a :class:`TrainerConfig`.
        scheduler: an epoch-wise learning-rate scheduler, or None.
        loss_fn: default ``nn.CrossEntropyLoss()``.

    Example:
        >>> model = disttrain.models.get_model("small_cnn")
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        >>> trainer = disttrain.Trainer(model, opt, disttrain.data.digits(True), disttrain.data.digits(False),
        ...                             TrainerConfig(epochs=5, save_name="digits"))
        >>> summary = trainer.fit()   # under torchrun, or alone as one rank
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_set: Dataset,
                 val_set: Dataset | None = None, config: TrainerConfig | None = None,
                 scheduler: Any | None = None, loss_fn: Callable | None = None):
        self.config = config or TrainerConfig(epochs=1)
        cfg = self.config
        if not dist.is_initialized():
            init_process_group(backend=cfg.backend, timeout=cfg.timeout_seconds)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = str(dist.get_backend())
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        _seed_everything(cfg.seed + self.rank)
        self.module = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.train_set, self.val_set = train_set, val_set
        columns = describe_run(self.module, optimizer, scheduler, self.loss_fn, self.world_size,
                               self.local_world_size, self.backend, cfg.batch_size, cfg.num_workers,
                               cfg.epochs, self._device_name(), float(optimizer.param_groups[0]["lr"]))
        self.sharded = cfg.strategy == "fsdp"
        if self.sharded:
            from .fsdp import FullyShardedDataParallel
            fsdp = FullyShardedDataParallel(self.module, stage=cfg.zero_stage, auto_wrap=_FSDP_MIN_UNIT_PARAMS)
            self.model: Any = fsdp  # FullyShardedDataParallel, the module itself, or DDP around it
            self.optimizer = _rebuild_over_shards(optimizer, fsdp, scheduler)
        elif cfg.strategy == "none":
            if self.world_size != 1:
                raise ValueError(f"Trainer: strategy 'none' (no data parallelism) runs on one rank; the job has "
                                 f"{self.world_size}")
            self.model = self.module
        else:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = _ddp_class(cfg.strategy)(self.module, **ddp_kwargs)

        self.base_lr = float(self.optimizer.param_groups[0]["lr"])
        self.lr_scale = _lr_factor(cfg.lr_scaling, self.world_size)
        self._rescale_lr(self.lr_scale)

        self.sampler = _sampler_class()(train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                        seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)

        self.run_dir = os.path.join(cfg.save_location, cfg.save_name)
        self.snapshot_dir = os.path.join(self.run_dir, "snapshots")
        self.best_model_path = os.path.join(self.run_dir, "best_model.dts")
        self.metrics_path = os.path.join(self.run_dir, "metrics.csv")
        if self.rank == 0:
            os.makedirs(self.snapshot_dir, exist_ok=True)
        dist.barrier()
        self._snapshotter = snapshot.AsyncSnapshotter(self.snapshot_dir, keep=cfg.keep_snapshots) \
            if self.rank == 0 else None
        self._best_writer = snapshot.AsyncSnapshotter(self.run_dir, keep=None) if self.rank == 0 else None
        self._faults = FaultInjector(self.rank, self.run_dir, self.snapshot_dir)
        if self._faults.where == "forward":
            self.module.register_forward_pre_hook(lambda *_: self._faults.in_forward(self.global_step))
        self._columns = {**columns, **cfg.configuration}

        # Progress; all of it is in every snapshot.
        self.epoch = 0              # epochs completed
        self.batches_done = 0       # batches of the current epoch completed
        self.global_step: int = 0
        self.run_time = 0.0         # seconds of training, across restarts
        self.best_val_loss = math.inf
        self.history: dict[str, list[float]] = {k: [] for k in (
            "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time", "test_time")}
        self._partial = {"loss_sum": 0.0, "correct": 0, "count": 0, "elapsed": 0.0}
        self._stop_requested = False
        self._resumed_from: str | None = None

    # ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Trains until the epoch count or the time budget is reached.

        Returns:
            A summary: ``epochs``, ``run_time``, ``best_val_loss``, ``final_test_acc``,
            ``run_dir``, ``resumed_from``, ``preempted``.
        """
        cfg = self.config
        self._say(f"disttrain: run folder {self.run_dir} (snapshots/, best_model.dts, metrics.csv"
                  f"{', tensorboard/' if cfg.tensorboard else ''}); {self.world_size} rank(s), backend "
                  f"{self.backend}, lr {self.base_lr:g} x {self.lr_scale:g} ({cfg.lr_scaling})")
        if cfg.resume:
            self._restore()
        else:
            self._discard_snapshots()
        tb = self._tensorboard() if cfg.tensorboard and self.rank == 0 else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) \
            if _in_main_thread() else None
        self._segment_start = time.perf_counter()
        self._run_time_at_start = self.run_time
        preempted = False
        try:
            while not self._agree(not self._another_epoch()):
                self._train_epoch()
                self._end_epoch(tb)
        except _Preempted:
            preempted = True
        except OSError:  # a write failed (full disk, ...): the other writer's error is that one's twin
            self._wait_writers(quiet=True)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if tb is not None:
                tb.close()
        self.run_time = self._now_run_time()
        self._wait_writers()
        summary = {"epochs": self.epoch, "run_time": self.run_time, "best_val_loss": self.best_val_loss,
                   "final_test_acc": self.history["test_acc"][-1] if self.history["test_acc"] else None,
                   "final_train_loss": self.history["train_loss"][-1] if self.history["train_loss"] else None,
                   "run_dir": self.run_dir, "resumed_from": self._resumed_from, "preempted": preempted}
        acc = summary["final_test_acc"]
        self._say(f"disttrain: {'preempted, snapshot saved' if preempted else 'done'}: {self.epoch} epoch(s) "
                  f"in {self.run_time:.1f} s, best validation loss {self.best_val_loss:.4f}"
                  + (f", test accuracy {acc:.4f}" if acc is not None else "") + f"; results in {self.run_dir}")
        if preempted:
            sys.exit(128 + signal.SIGTERM)
        return summary

    # ----------------------------------------------------------------------------------------
    def _another_epoch(self) -> bool:
        cfg = self.config
        if cfg.epochs is not None and self.epoch >= cfg.epochs:
            return False
        if cfg.time_budget_hours is not None and self.rank == 0:
            budget = cfg.time_budget_hours * 3600
            per_epoch = [t + v for t, v in zip(self.history["epoch_time"], self.history["test_time"])]
            estimate = max(per_epoch[-3:]) if per_epoch else 0.0
            remaining_part = estimate * (1 - self.batches_done / max(1, self.steps_per_epoch))
            now = self._now_run_time()
            if now >= budget or now + remaining_part > budget:
                self._say(f"disttrain: time budget of {cfg.time_budget_hours:g} h reached "
                          f"(next epoch ~{estimate:.1f} s would not fit)")
                return False
        return True

    def _train_epoch(self) -> None:
        cfg = self.config
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        indices = list(self.sampler)[self.batches_done * cfg.batch_size:]
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=indices,
                            num_workers=cfg.num_workers, drop_last=False)
        start = time.perf_counter() - self._partial["elapsed"]
        for inputs, labels in loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            output = self.model(inputs)
            loss = self.loss_fn(output, labels)
            loss.backward()
            if self._snapshotter is not None:
                self._snapshotter.wait_staged()  # the snapshot's copy of the parameters, overlapped with this step
            self.optimizer.step()
            self._partial["loss_sum"] += loss.item() * len(labels)
            self._partial["correct"] += int((output.argmax(1) == labels).sum())
            self._partial["count"] += len(labels)
            self.global_step += 1
            self.batches_done += 1
            self._partial["elapsed"] = time.perf_counter() - start
            self._progress()
            stop = self._agree(self._stop_requested, fault_step=self.global_step)
            if stop or (cfg.snapshot_every_steps and self.global_step % cfg.snapshot_every_steps == 0
                        and self.batches_done < self.steps_per_epoch):
                self._snapshot()
            if stop:
                if self._snapshotter is not None:
                    self._snapshotter.wait()
                raise _Preempted()
        self._partial["elapsed"] = time.perf_counter() - start

    def _end_epoch(self, tb) -> None:
        sums = torch.tensor([self._partial["loss_sum"], self._partial["correct"], self._partial["count"]],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        train_loss, train_acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        epoch_time = self._partial["elapsed"]
        test_start = time.perf_counter()
        test_loss, test_acc = self._evaluate()
        test_time = time.perf_counter() - test_start
        if self.scheduler is not None:
            self.scheduler.step()
        for key, value in (("train_loss", train_loss), ("train_acc", train_acc), ("test_loss", test_loss),
                           ("test_acc", test_acc), ("epoch_time", epoch_time), ("test_time", test_time)):
            self.history[key].append(value)
        self.epoch += 1
        self.batches_done = 0
        self._partial = {"loss_sum": 0.0, "correct": 0, "count": 0, "elapsed": 0.0}
        improved = test_loss < self.best_val_loss
        if improved:
            self.best_val_loss = test_loss
        best_state = self._model_state() if improved else None  # collective with fsdp
        if self.rank == 0:
            assert self._best_writer is not None  # rank 0's
            if improved:
                self._best_writer.save({"model": best_state, "epoch": self.epoch,
                                        "val_loss": test_loss, "val_acc": test_acc,
                                        "configuration": dict(self._columns)}, path=self.best_model_path)
            write_metrics_csv(self.metrics_path, self.history, self._columns)
            if tb is not None:
                for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                    tb.add_scalar(key, self.history[key][-1], self.epoch)
            epochs = f"/{self.config.epochs}" if self.config.epochs is not None else ""
            self._say(f"epoch {self.epoch}{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                      f"test loss {test_loss:.4f} acc {test_acc:.4f} | {epoch_time:.1f}+{test_time:.1f} s"
                      + (" *" if improved else ""), end_progress=True)
        self._snapshot()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        if self.val_set is None:
            return math.nan, math.nan
        # Every rank evaluates with rank 0's batch-norm statistics, as a resumed run would.
        for buffer in self.module.buffers():
            dist.broadcast(buffer, 0)
        self.module.eval()
        forward = self.model if self.sharded else self.module  # fsdp gathers parameters in its hooks
        val_batch = self.config.batch_size * 2
        loader = DataLoader(self.val_set, batch_size=val_batch,
                            sampler=_ShardSampler(len(cast(Sized, self.val_set)), self.rank, self.world_size),
                            num_workers=self.config.num_workers)
        sums = torch.zeros(3, dtype=torch.float64)
        batches = 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            output = forward(inputs)
            sums[0] += self.loss_fn(output, labels).item() * len(labels)
            sums[1] += int((output.argmax(1) == labels).sum())
            sums[2] += len(labels)
            batches += 1
        if self.sharded:
            # The sharded forward is collective (stage 3 gathers each unit): every rank runs as many
            # as rank 0, which holds the most samples; the extra ones (one sample each) do not count.
            most = math.ceil(math.ceil(len(cast(Sized, self.val_set)) / self.world_size) / val_batch)
            if batches < most:
                filler = default_collate([self.val_set[0]])[0].to(self.device)
                for _ in range(most - batches):
                    forward(filler)
        dist.all_reduce(sums)
        self.module.train()
        return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()

    # --- snapshots ---------------------------------------------------------------------------
    def _model_state(self) -> dict[str, Any]:
        """The unwrapped model's state dict (on rank 0; collective with fsdp)."""
        return self.model.full_state_dict() if self.sharded else self.module.state_dict()

    def _optimizer_state(self) -> Any:
        """The optimizer's state (collective with fsdp: every rank's shard state, gathered on rank 0)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        states = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(self.optimizer.state_dict(), states, dst=0)
        return {"sharded": states}

    def _state(self, rank_states: list[Any], model_state: Any, optimizer_state: Any) -> dict[str, Any]:
        sampler_state = getattr(self.sampler, "state_dict", None)
        return {
            "format": _STATE_FORMAT,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": {"epoch": self.epoch, "batches_done": self.batches_done, "batch_size": self.config.batch_size,
                        "seed": self.config.seed, "world_size": self.world_size,
                        "state": sampler_state() if callable(sampler_state) else None},
            "rank_states": rank_states,
            "epochs_run": self.epoch,
            "global_step": self.global_step,
            "run_time": self._now_run_time(),
            "history": self.history,
            "best_val_loss": self.best_val_loss,
            "lr_scale": self.lr_scale,
            "world_size": self.world_size,
            "configuration": dict(self._columns),
        }

    def _snapshot(self) -> None:
        mine = {"rng": _rng_state(), "partial": dict(self._partial)}
        rank_states: list[Any] = [None] * self.world_size
        dist.all_gather_object(rank_states, mine)
        model_state, optimizer_state = self._model_state(), self._optimizer_state()
        if self.rank == 0:
            self._faults.before_snapshot(self.global_step)
            state = self._state(rank_states, model_state, optimizer_state)
            # Forward changes batch-norm statistics in place; everything else in the
            # state changes only in optimizer.step(), which waits for the copy.
            for name, _ in self.module.named_buffers():
                if name in state["model"]:
                    state["model"][name] = state["model"][name].clone()
            assert self._snapshotter is not None  # rank 0's
            self._snapshotter.save(state, step=self.global_step, copy_in_background=True)

    def _restore(self) -> None:
        found: list[str | None] = [None]
        if self.rank == 0:
            path, state = snapshot.load_latest(self.snapshot_dir)
            found = [path]
        dist.broadcast_object_list(found, 0)
        path = found[0]
        if path is None:
            return
        if self.rank != 0:
            state = snapshot.load(path)
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ResumeError(f"cannot resume from '{path}': not a disttrain trainer snapshot; start over with "
                              "--no-resume (resume=False) or use another --save-name")
        # Another data set's run with the same model (ten classes both) went on in silence, its
        # epochs then labelled with this data set in metrics.csv.
        configuration = state.get("configuration")
        saved_columns: dict[str, Any] = configuration if isinstance(configuration, dict) else {}
        saved_data, data = saved_columns.get("dataset"), self._columns.get("dataset")
        if saved_data is not None and data is not None and saved_data != data:
            raise ResumeError(f"cannot resume from '{path}': it was trained on the data set '{saved_data}', this run "
                              f"is on '{data}'; start over with --no-resume (resume=False) or use another --save-name")
        # Keys and shapes (fsdp: the parameters' keys, whose shapes its load checks before any
        # collective, and the buffers, which the wrapped module still holds, with their shapes).
        if self.sharded:
            current: dict[str, Any] = {k: None for k in self.model._state_keys}
            current.update(self.module.state_dict())
        else:
            current = self.module.state_dict()
        mismatch = _state_mismatch(state.get("model"), current)
        if mismatch is not None:
            made_with = saved_columns.get("model_name")
            raise ResumeError(f"cannot resume from '{path}': it holds another model"
                              + (f" ('{made_with}')" if made_with else "") + f" ({mismatch}); resume with the "
                              "model it was made with, or start over with --no-resume (resume=False) "
                              "or use another --save-name")
        if self.sharded:
            try:
                self.model.load_full_state_dict(state["model"])
            except ValueError as e:  # a shape
                raise ResumeError(f"cannot resume from '{path}': it holds another model ({e}); resume with the "
                                  "model it was made with, or start over with --no-resume "
                                  "(resume=False) or use another --save-name") from None
            shards = state["optimizer"].get("sharded") if isinstance(state["optimizer"], dict) else None
            optimizer_loaded = shards is not None and len(shards) == self.world_size
            if shards is not None and optimizer_loaded:
                self._load_optimizer_state(path, state, shards[self.rank])
            else:
                self._say(f"disttrain: '{path}' holds no sharded optimizer state for {self.world_size} ranks; "
                          "the optimizer starts fresh")
        else:
            self.module.load_state_dict(state["model"])
            # An fsdp run's snapshot holds every rank's shard state: the optimizer starts fresh,
            # as an fsdp resume does with another world size's shard states.
            optimizer_loaded = not (isinstance(state["optimizer"], dict) and "sharded" in state["optimizer"])
            if optimizer_loaded:
                self._load_optimizer_state(path, state, state["optimizer"])
            else:
                self._say(f"disttrain: '{path}' holds the sharded optimizer state of strategy 'fsdp'; "
                          "the optimizer starts fresh")
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        # The loaded state has the snapshot's world size's learning rate; a fresh optimizer has ours already.
        self._rescale_lr(self.lr_scale / state["lr_scale"], optimizer=optimizer_loaded)
        if optimizer_loaded:
            self._keep_saved_hyperparameters(state)
        self.epoch = state["epochs_run"]
        self.global_step = state["global_step"]
        self.run_time = state["run_time"]
        self.history = state["history"]
        self.best_val_loss = state["best_val_loss"]
        sampler = state["sampler"]
        same_shape = sampler["world_size"] == self.world_size and sampler["batch_size"] == self.config.batch_size
        self.batches_done = sampler["batches_done"] if same_shape else 0
        if same_shape:
            rank_state = state["rank_states"][self.rank]
            _set_rng_state(rank_state["rng"])
            self._partial = dict(rank_state["partial"])
        else:
            if sampler["batches_done"]:
                self._say(f"disttrain: world size or batch size changed since '{path}'; epoch {self.epoch + 1} "
                          "restarts from its beginning")
            _seed_everything(self.config.seed + 1000 * self.rank + self.epoch)
        self._resumed_from = path
        self._say(f"disttrain: resumed from {path} (epoch {self.epoch}, step {self.global_step}, "
                  f"{self.run_time:.1f} s run)")

    def _load_optimizer_state(self, path: str, state: dict[str, Any], optimizer_state: Any) -> None:
        """Loads the snapshot's optimizer state, or raises a one-line ResumeError: another optimizer
        class's state would load (torch checks only the parameter counts) and fail at the first
        step with a bare KeyError ('step', 'betas', ...)."""
        mine = type(self.optimizer).__name__
        saved = state.get("configuration")
        saved = saved.get("optimizer") if isinstance(saved, dict) else None
        if isinstance(saved, str) and saved != self._columns.get("optimizer", mine):
            raise ResumeError(f"cannot resume from '{path}': its optimizer state is {saved}'s, this optimizer is "
                              f"{mine}; resume with the optimizer it was made with, or start over with --no-resume "
                              "(resume=False) or use another --save-name")
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"cannot resume from '{path}': its optimizer state does not fit this optimizer "
                              f"({mine}: {str(e).splitlines()[0] if str(e) else e!r}); "
                              "start over with --no-resume (resume=False) or use another "
                              "--save-name") from None

    def _keep_saved_hyperparameters(self, state: dict[str, Any]) -> None:
        """The optimizer (and scheduler) state just loaded brought the snapshot's learning rate,
        momentum, ... (as ``load_state_dict`` does in PyTorch): metrics.csv records those, and a
        command that gave others hears that they do not apply to a resumed run."""
        saved = state.get("configuration")
        if not isinstance(saved, dict):
            return
        keys = ["learning_rate", "momentum", "weight_decay"]
        if self.scheduler is not None and state.get("scheduler") is not None:
            keys += ["gamma", "milestones"]
        changed = [k for k in keys if k in saved and k in self._columns and saved[k] != self._columns[k]]
        if changed:
            self._say("disttrain: resuming with the snapshot's " + ", ".join(
                f"{k} {saved[k]!r}" for k in changed) + " (given now: " + ", ".join(
                f"{self._columns[k]!r}" for k in changed) + "; they apply to a new run: --no-resume or another "
                "--save-name)")
        for k in changed:
            self._columns[k] = saved[k]

    def _wait_writers(self, quiet: bool = False) -> None:
        """Waits for both of rank 0's writes; raises the first one's error (unless ``quiet``) once
        both are done, so that a second failure of the same cause is not reported apart."""
        first: OSError | None = None
        for writer in (self._snapshotter, self._best_writer):
            if writer is not None:
                try:
                    writer.wait()
                except OSError as e:
                    first = first or e
        if first is not None and not quiet:
            raise first

    def _discard_snapshots(self) -> None:
        """Without resume the run starts over: the snapshots of an earlier run in the folder
        go (metrics.csv and best_model.dts are rewritten by this run anyway). Left there,
        keep-last-K would delete this run's snapshots, the earlier run's having the higher
        steps, and a later resume would continue the earlier run, not this one."""
        if self.rank != 0:
            return
        assert self._snapshotter is not None  # rank 0's
        old = self._snapshotter._own_snapshots(exclude="")  # step_<n>.dts only, never a user's copy
        for path in old:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if old:
            self._say(f"disttrain: not resuming: removed {len(old)} snapshot(s) of an earlier run from "
                      f"{self.snapshot_dir}")

    # --- helpers -----------------------------------------------------------------------------
    def _agree(self, flag: bool, fault_step: int | None = None) -> bool:
        """True on every rank if ``flag`` is true on any (one small all-reduce)."""
        if fault_step is not None:
            self._faults.in_collective(fault_step, lambda: dist.all_reduce(flag_tensor(flag), async_op=True))
        return any_rank(flag)

    def _rescale_lr(self, factor: float, optimizer: bool = True) -> None:
        if factor == 1.0:
            return
        for group in self.optimizer.param_groups if optimizer else ():
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            if hasattr(self.scheduler, "_last_lr"):
                self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _now_run_time(self) -> float:
        segment = getattr(self, "_segment_start", None)
        if segment is None:
            return self.run_time
        return self._run_time_at_start + time.perf_counter() - segment

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._say("disttrain: tensorboard is not installed (pip install tensorboard); logging to CSV only")
            return None
        return SummaryWriter(os.path.join(self.run_dir, "tensorboard"))

    def _progress(self) -> None:
        if self.rank != 0 or not self.config.progress or not sys.stderr.isatty():
            return
        done, total = self.batches_done, self.steps_per_epoch
        width = 30
        filled = width * done // max(1, total)
        loss = self._partial["loss_sum"] / max(1, self._partial["count"])
        sys.stderr.write(f"\repoch {self.epoch + 1} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{total} loss {loss:.4f}")
        sys.stderr.flush()

    def _say(self, text: str, end_progress: bool = False) -> None:
        if self.rank != 0:
            return
        if end_progress and self.config.progress and sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 79 + "\r")
        print(text, flush=True)


def _rebuild_over_shards(optimizer: torch.optim.Optimizer, model: FullyShardedDataParallel,
                         scheduler: Any) -> torch.optim.Optimizer:
    """The same optimizer (class, hyperparameters of its first group) over the
    sharded model's shards; a scheduler is pointed at it."""
    from .fsdp import ShardedOptimizer
    if len(optimizer.param_groups) != 1 or optimizer.state:
        raise ValueError("Trainer: with strategy 'fsdp' the optimizer must have one parameter group and no state yet "
                         "(it is rebuilt over the shards)")
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    # The constructor gets the settings it takes; the group then gets every one as it was: a group
    # also holds keys no constructor argument names (a scheduler's initial_lr, AdamW's
    # decoupled_weight_decay, which AdamW.__init__ refuses).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    sharded = ShardedOptimizer(type(optimizer), model,
                               **{k: v for k, v in group.items() if takes_any or k in accepted})
    sharded.param_groups[0].update(group)
    if scheduler is not None:
        scheduler.optimizer = sharded
        _mark_step_for_scheduler(sharded)
    return sharded


def _mark_step_for_scheduler(optimizer: torch.optim.Optimizer) -> None:
    """What a scheduler's constructor does to its optimizer's ``step`` (torch's
    ``patch_track_step_called``): without it the scheduler's first step warns that
    ``optimizer.step()`` was overridden after the scheduler was made."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    optimizer_ref = weakref.ref(optimizer)
    step = type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = optimizer_ref()
        assert opt is not None  # the wrapper is the optimizer's own attribute
        opt._opt_called = True  # type: ignore[attr-defined]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
