"""Hogwild!: several processes train one model whose parameters live in shared
memory, each applying its updates with no lock (Niu et al., 2011).

The per-step update runs in C++ with the GIL released
(``csrc/strategies/hogwild_update.cpp``): the parameters of each optimizer
parameter group are one flat shared buffer, the gradients one flat private
buffer per process, so a step is one pass over memory that also zeroes the
gradient for the next backward. What the classic recipe (PyTorch's
mnist_hogwild example) leaves implicit is explicit here:

- **Data**: ``data="split"`` (default) gives each process a disjoint share of
  every epoch (each sample once per epoch across the processes, as
  data-parallel training does); ``data="full"`` reproduces the classic
  behaviour, where every process reads the whole data set (N processes do N
  times the work per "epoch"), for comparison.
- **Optimizer state**: ``optimizer_state="shared"`` (default) keeps one
  momentum buffer (SGD) or one pair of moments (Adam) in shared memory, updated
  lock-free like the parameters, and one step counter advanced atomically, so
  Adam's bias correction uses the job's global step; ``"per_process"`` gives
  each process its own state and its own step counter (the classic recipe's
  behaviour, where each process builds its own optimizer).
- **Threads**: one torch thread per process by default, so N processes never
  oversubscribe the cores (with the classic recipe each process takes every
  core: on 2 cores, 2 processes run 18x slower here). A forked process must
  not start OpenMP threads after its parent has (GNU OpenMP hangs), so more
  threads per process need ``start_method="spawn"`` (``threads_per_process``
  gives the share of the cores).
- **Failures**: a process that raises or dies makes :func:`train_model` stop the
  others and raise :class:`HogwildProcessError` naming it and its error.

Supported optimizers: ``torch.optim.SGD`` (momentum, dampening, Nesterov,
weight decay, maximize) and ``torch.optim.Adam`` / ``AdamW`` (no amsgrad),
float32 or float64 parameters, on the CPU.
"""

from __future__ import annotations

import functools
import inspect
import math
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor-sharing reductions)
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from .. import _C
from .._processes import describe_exit, stop
from . import _common

DATA_MODES = ("split", "full")
STATE_MODES = ("shared", "per_process")
START_METHODS = ("fork", "spawn")


class HogwildProcessError(RuntimeError):
    """A Hogwild process raised an exception or died; the message names it."""


class _Deadline(Exception):
    """The one-process run (in the caller) passed its ``timeout``."""


class TrainingLosses(list):
    """The training losses of every step of every process, in the order the
    steps ended (a ``list`` of floats), with the run's figures as attributes.

    Attributes:
        elapsed: seconds from the common start of the processes to the end of the last.
        updates: optimizer steps taken, all processes together.
        updates_per_second: ``updates / elapsed``.
        per_process: for each process, ``{"process", "steps", "samples", "losses", "times", "seconds"}``
            (``times[i]``: training seconds at the end of its step i).
        test_accuracy: accuracy on the test loader after training (``None`` without one).
        test_loss: mean loss on the test loader (``None`` without one).
        epochs: with a test loader, one ``{"epoch", "seconds", "test_loss",
            "test_accuracy"}`` per epoch: the processes wait for each other at
            the end of each epoch while the shared model is evaluated, and
            ``seconds`` is the slowest process's training time so far (the
            evaluation is not counted).
        samples_seen: how many times each training sample was used, all processes
            together (a tensor of the data set's length).
    """

    elapsed: float
    updates: int
    updates_per_second: float
    per_process: list[dict[str, Any]]
    test_accuracy: float | None
    test_loss: float | None
    epochs: list[dict[str, Any]]
    samples_seen: torch.Tensor


@dataclass
class _Group:
    """One optimizer parameter group, flattened: its parameters are views of
    ``flat`` (shared memory) and its hyperparameters a plain dict."""

    params: list[nn.Parameter]
    flat: torch.Tensor
    hyper: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # shared optimizer state (shared mode)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_process(num_processes: int, cores: int | None = None) -> int:
    """Torch threads for each of ``num_processes`` processes so that together
    they use the cores at most once (at least one thread each)."""
    return max(1, (cores or _cores()) // max(1, num_processes))


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, torch.optim.Adam) or isinstance(optimizer, torch.optim.AdamW):
        for group in optimizer.param_groups:
            if group.get("amsgrad"):
                raise ValueError("hogwild: Adam with amsgrad=True is not supported (use amsgrad=False)")
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    raise ValueError(f"hogwild: optimizer {type(optimizer).__name__} is not supported; "
                     "use torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW")


def _hyper(kind: str, optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> dict[str, Any]:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    if kind == "sgd":
        return {"lr": float(lr), "momentum": float(group.get("momentum", 0.0)),
                "dampening": float(group.get("dampening", 0.0)), "weight_decay": float(group.get("weight_decay", 0.0)),
                "nesterov": bool(group.get("nesterov", False)), "maximize": bool(group.get("maximize", False))}
    beta1, beta2 = group["betas"]
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return {"lr": float(lr), "beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"]),
            "weight_decay": float(group.get("weight_decay", 0.0)), "decoupled_weight_decay": decoupled,
            "maximize": bool(group.get("maximize", False))}


def _state_names(kind: str, hyper: Mapping[str, Any]) -> tuple[str, ...]:
    if kind == "adam":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if hyper["momentum"] != 0.0 else ()


def _flatten_groups(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str) -> list[_Group]:
    """Moves each optimizer group's parameters into one flat shared buffer (the
    parameters become views of it) and copies any optimizer state the
    optimizer already holds into flat buffers of the same layout."""
    model_params = {id(p) for p in model.parameters()}
    groups = []
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        for p in params:
            if id(p) not in model_params:
                raise ValueError("hogwild: the optimizer holds a parameter that is not the model's; "
                                 "build the optimizer on model.parameters()")
            if p.device.type != "cpu":
                raise ValueError(f"hogwild: parameters must be on the CPU, found one on {p.device}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise ValueError(f"hogwild: each parameter group must be all float32 or all float64, found {dtypes}")
        dtype = params[0].dtype
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype).share_memory_()
        hyper = _hyper(kind, optimizer, g)
        group = _Group(params=params, flat=flat, hyper=hyper)
        for name in _state_names(kind, hyper):
            group.state[name] = torch.zeros_like(flat).share_memory_()
        step = 0
        offset = 0
        for p in params:
            n = p.numel()
            view = flat[offset:offset + n].view_as(p)
            view.copy_(p.detach())
            p.data = view
            old = optimizer.state.get(p, {})
            for name, buf in group.state.items():
                if isinstance(old.get(name), torch.Tensor):
                    buf[offset:offset + n].copy_(old[name].reshape(-1))
            if "step" in old:
                step = max(step, int(float(old["step"])))
            offset += n
        group.state["step"] = torch.tensor([step], dtype=torch.int64).share_memory_()
        groups.append(group)
    if not groups:
        raise ValueError("hogwild: the optimizer has no parameter that requires a gradient")
    return groups


def _write_back_state(optimizer: torch.optim.Optimizer, groups: list[_Group]) -> None:
    """Shared mode: the optimizer object ends with the job's shared state, as if
    it had taken every step itself (views of the shared buffers)."""
    for group in groups:
        step = float(group.state["step"].item())
        offset = 0
        for p in group.params:
            n = p.numel()
            state = {name: buf[offset:offset + n].view_as(p) for name, buf in group.state.items() if name != "step"}
            if state or step:
                state["step"] = torch.tensor(step)
                optimizer.state[p] = state
            offset += n


def epoch_indices(dataset_size: int, num_processes: int, process: int, epoch: int, seed: int,
                  data: str = "split") -> torch.Tensor:
    """The sample indices process ``process`` visits in ``epoch``, in order.

    ``"split"``: one permutation of the data set per epoch (seeded by
    ``seed + epoch``), dealt round-robin over the processes, so each sample is
    visited exactly once per epoch across them. ``"full"``: every process
    visits every sample, in its own order (process 0's order is the split
    order of a single process).
    """
    if data == "split":
        return _common.split_epoch(dataset_size, num_processes, process, epoch, seed)
    if data == "full":
        return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch + 7919 * process))
    raise ValueError(f"hogwild: data={data!r}; choose from {', '.join(DATA_MODES)}")


def _batches(loader_spec: dict[str, Any], indices: torch.Tensor) -> Iterator[Any]:
    """Batches of ``indices`` from the data set, collated as the user's loader
    would. A TensorDataset with the default collate is sliced directly (the
    same tensors as collating sample by sample, without the per-sample cost)."""
    dataset, batch_size, drop_last = loader_spec["dataset"], loader_spec["batch_size"], loader_spec["drop_last"]
    collate = loader_spec["collate_fn"]
    n = len(indices)
    stop = n - n % batch_size if drop_last else n
    direct = isinstance(dataset, TensorDataset) and collate is default_collate
    for start in range(0, stop, batch_size):
        index = indices[start:start + batch_size]
        if direct:
            yield [t[index] for t in dataset.tensors]
        else:
            yield collate([dataset[int(i)] for i in index])


def _loader_spec(loader: DataLoader | Any) -> dict[str, Any]:
    if not isinstance(loader, DataLoader):
        raise TypeError(f"hogwild: train_dataloader must be a torch.utils.data.DataLoader, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("hogwild: the train loader needs a batch_size (a batch_sampler is not supported)")
    try:
        len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("hogwild: the train loader's data set must have a length (a map-style data set)") from None
    return {"dataset": loader.dataset, "batch_size": loader.batch_size, "drop_last": loader.drop_last,
            "collate_fn": loader.collate_fn}


def _step(kind: str, group: _Group, grad: torch.Tensor, state: Mapping[str, torch.Tensor]) -> None:
    h = group.hyper
    if kind == "sgd":
        _C.hogwild_sgd_update(group.flat, grad, state.get("momentum_buffer"), state["step"], h["lr"], h["momentum"],
                              h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], True)
    else:
        _C.hogwild_adam_update(group.flat, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], h["lr"],
                               h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["decoupled_weight_decay"],
                               h["maximize"], True)


def _process_main(process: int, job: dict[str, Any], results: Any, start: Any) -> None:
    try:
        torch.set_num_threads(job["threads"])
        torch.manual_seed(job["seed"] + process)
        model, kind, groups = job["model"], job["kind"], job["groups"]
        model.train()
        grads, states = [], []
        for group in groups:
            grad = torch.zeros_like(group.flat)
            offset = 0
            for p in group.params:
                n = p.numel()
                p.data = group.flat[offset:offset + n].view_as(p)
                p.grad = grad[offset:offset + n].view_as(p)
                offset += n
            if job["optimizer_state"] == "shared":
                state = group.state
            else:
                state = {name: buf.clone() for name, buf in group.state.items()}  # starts from the optimizer's own
            grads.append(grad)
            states.append(state)
        grouped = {id(p) for g in groups for p in g.params}
        others = [p for p in model.parameters() if id(p) not in grouped]
        loss_fn, spec, log_interval = job["loss_fn"], job["loader"], job["log_interval"]
        size = len(spec["dataset"])
        seen = job["samples_seen"][process]  # this process's own row: no lost updates between processes
        losses: list[float] = []
        times: list[float] = []
        samples = 0
        results.put(("ready", process))
        start.wait()
        t0 = time.perf_counter()
        paused = 0.0  # waiting for the per-epoch evaluation is not training time
        for epoch in range(job["epochs"]):
            indices = epoch_indices(size, job["num_processes"], process, epoch, job["seed"], job["data"])
            seen.index_add_(0, indices, torch.ones(len(indices), dtype=seen.dtype))
            for step, batch in enumerate(_batches(spec, indices)):
                data, target = _common.split_batch(batch)
                loss = loss_fn(model(data), target)
                loss.backward()
                for p in others:
                    p.grad = None
                for group, grad, state in zip(groups, grads, states):
                    _step(kind, group, grad, state)
                losses.append(loss.item())
                if job.get("deadline") is not None and time.monotonic() > job["deadline"]:
                    raise _Deadline(f"hogwild: the training process did not finish within {job['timeout']} s")
                times.append(time.perf_counter() - t0 - paused)
                samples += len(target)
                if log_interval > 0 and step % log_interval == 0:
                    print(f"hogwild process {process}: epoch {epoch + 1} [{min((step + 1) * spec['batch_size'], len(indices))}"
                          f"/{len(indices)}] loss {losses[-1]:.6f}", flush=True)
            if job["epoch_end"] is not None:
                t_wait = time.perf_counter()
                job["epoch_end"](process, epoch, t_wait - t0 - paused)
                paused += time.perf_counter() - t_wait
        results.put(("done", process, {"process": process, "steps": len(losses), "samples": samples,
                                       "losses": losses, "times": times,
                                       "seconds": time.perf_counter() - t0 - paused}))
    except _Deadline as e:
        results.put(("error", process, str(e)))
    except BaseException:  # every failure reaches the parent, named
        results.put(("error", process, traceback.format_exc()))


def _epoch_barrier(results: Any, resume: list[Any], process: int, epoch: int, trained: float) -> None:
    """A process's end of epoch when the parent evaluates: report, then wait
    until the parent has evaluated the shared model."""
    results.put(("epoch", process, epoch, trained))
    resume[epoch].wait()


def _wait_all(procs: list[Any], results: Any, timeout: float | None, start: Any,
              on_epoch: Callable[[int, float], None] | None = None,
              resume: list[Any] | None = None) -> list[dict[str, Any]]:
    """Collects every process's report; the first failure (an exception, a
    death, the deadline) stops the others and raises naming the process. When
    every process has ended epoch e, ``on_epoch(e, slowest process's training
    seconds)`` runs and ``resume[e]`` releases them."""
    n = len(procs)
    epoch_ends: dict[int, list[float]] = {}
    ready: set[int] = set()
    done: dict[int, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(done) < n:
        try:
            msg = results.get(timeout=0.2)
        except queue.Empty:
            msg = None
        if msg is not None:
            kind, process = msg[0], msg[1]
            if kind == "error":
                raise HogwildProcessError(f"hogwild: process {process} of {n} raised:\n{msg[2]}")
            if kind == "ready":
                ready.add(process)
                if len(ready) == n:
                    start.set()
            elif kind == "epoch":
                ends = epoch_ends.setdefault(msg[2], [])
                ends.append(msg[3])
                if len(ends) == n:
                    if on_epoch is not None:
                        on_epoch(msg[2], max(ends))
                    if resume is not None:
                        resume[msg[2]].set()
            else:
                done[process] = msg[2]
            continue
        for i, proc in enumerate(procs):
            if i not in done and proc.exitcode is not None:
                # A clean exit may still have its report in flight: give the queue a moment.
                try:
                    msg = results.get(timeout=1.0)
                except queue.Empty:
                    raise HogwildProcessError(
                        f"hogwild: process {i} of {n} (pid {proc.pid}) {describe_exit(proc.exitcode)} "
                        "before finishing its epochs") from None
                results.put(msg)
                break
        if deadline is not None and time.monotonic() > deadline:
            missing = sorted(set(range(n)) - set(done))
            raise HogwildProcessError(f"hogwild: processes {missing} did not finish within {timeout} s")
    return [done[i] for i in range(n)]


def _run_in_this_process(job: dict[str, Any], on_epoch: Callable[[int, float], None] | None,
                         timeout: float | None = None) -> dict[str, Any]:
    """One process: the same loop in the caller; its thread count and RNG state
    are restored afterwards; ``timeout`` is checked after every step."""
    results: queue.Queue = queue.Queue()
    start = threading.Event()
    start.set()
    threads = torch.get_num_threads()
    epoch_end = None if on_epoch is None else (lambda process, epoch, trained: on_epoch(epoch, trained))
    with torch.random.fork_rng(devices=[]):
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            _process_main(0, dict(job, epoch_end=epoch_end, deadline=deadline, timeout=timeout), results, start)
        finally:
            torch.set_num_threads(threads)
    while True:
        msg = results.get_nowait()
        if msg[0] == "error":
            if msg[2].startswith("hogwild: the training process did not finish"):
                raise HogwildProcessError(msg[2])
            raise HogwildProcessError(f"hogwild: the training process raised:\n{msg[2]}")
        if msg[0] == "done":
            return msg[2]


def _run_processes(job: dict[str, Any], start_method: str, timeout: float | None,
                   on_epoch: Callable[[int, float], None] | None) -> list[dict[str, Any]]:
    ctx: Any = mp.get_context(start_method)  # torch.multiprocessing (imported) shares tensors passed to spawned processes
    results = ctx.Queue()
    start = ctx.Event()
    resume = None
    if on_epoch is not None:
        resume = [ctx.Event() for _ in range(job["epochs"])]
        job = dict(job, epoch_end=functools.partial(_epoch_barrier, results, resume))
    procs = [ctx.Process(target=_process_main, args=(i, job, results, start), daemon=True, name=f"hogwild-{i}")
             for i in range(job["num_processes"])]
    for proc in procs:
        proc.start()
    try:
        return _wait_all(procs, results, timeout, start, on_epoch, resume)
    finally:
        stop(procs, grace=10, terminate=True)


def _summed(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss_fn`` as the evaluation calls it (``reduction="sum"``): a loss
    without a ``reduction`` argument is taken as a batch mean and multiplied
    by the batch size."""
    try:
        takes = any(p.name == "reduction" or p.kind is p.VAR_KEYWORD
                    for p in inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): assume torch's convention
        takes = True
    if takes:
        return loss_fn

    def summed(output: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return loss_fn(output, target) * len(target)

    return summed


def evaluate(model: nn.Module, test_dataloader: Iterable[Any],
             loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> tuple[float, float]:
    """Mean loss and top-1 accuracy of ``model`` on ``test_dataloader``
    (``loss_fn`` without a ``reduction`` argument: taken as a batch mean)."""
    loss, accuracy, samples = _common.evaluate(model, test_dataloader, _summed(loss_fn))
    if samples == 0:
        raise ValueError("hogwild: the test loader is empty")
    return loss, accuracy


def train_model(model: nn.Module, train_dataloader: DataLoader, num_processes: int, epochs_per_process: int,
                optimizer: torch.optim.Optimizer, device: str = "cpu", log_interval: int = 10,
                loss_tracker: list[float] | None = None, seed: int = 42, *,
                test_dataloader: Iterable[Any] | None = None, data: str = "split", optimizer_state: str = "shared",
                loss_fn: Callable[..., torch.Tensor] = F.cross_entropy, threads: int | None = None,
                start_method: str = "fork", timeout: float | None = None) -> TrainingLosses:
    """Trains ``model`` with ``num_processes`` Hogwild processes.

    The model's trainable parameters move into shared memory (they stay the
    model's parameters: after the call ``model`` holds the trained values), then
    each process runs ``epochs_per_process`` epochs over its share of the data
    (see ``data``), applying ``optimizer``'s update rule lock-free after every
    batch. The processes start together; their start-up is not timed.

    Args:
        model: the model (CPU, float32 or float64 parameters).
        train_dataloader: its data set, batch size, ``drop_last`` and collate
            function are used; the order comes from :func:`epoch_indices`
            (its sampler and workers are not: each process loads in-line).
        num_processes: processes (>= 1).
        epochs_per_process: epochs each process runs (>= 1).
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` built on the
            model's parameters; its hyperparameters (per parameter group) and
            any state it holds are used; in shared mode it ends holding the
            shared state.
        device: ``"cpu"`` (Hogwild shares CPU memory between processes).
        log_interval: print a process's loss every this many of its steps; -1: no logs.
        loss_tracker: a list the losses are appended to (across calls).
        seed: seeds the data order (:func:`epoch_indices`) and each process's
            torch RNG (``seed + process``).
        test_dataloader: the shared model is evaluated on it after every epoch
            (the processes pause meanwhile; see ``TrainingLosses.epochs``); the
            loss and accuracy are logged (unless ``log_interval`` is -1) and returned.
        data: ``"split"`` (each sample once per epoch across processes) or
            ``"full"`` (every process reads every sample: the classic recipe).
        optimizer_state: ``"shared"`` or ``"per_process"`` (see the module docs).
        loss_fn: ``loss_fn(output, target)``, a batch mean (the evaluation passes
            ``reduction="sum"`` when it takes one); default cross-entropy on logits.
        threads: torch threads per process. Default: 1 with ``"fork"`` (a forked
            process must not start OpenMP threads after its parent has: GNU
            OpenMP hangs; one process, trained in the caller, may be given more),
            :func:`threads_per_process` with ``"spawn"``.
        start_method: ``"fork"`` (default, as the classic recipe: works from a
            notebook and with models defined anywhere) or ``"spawn"`` (several
            threads per process; the model and data set must be picklable and
            the script guarded by ``if __name__ == "__main__"``). One process
            trains in the calling process (no start-up, its RNG state restored).
        timeout: seconds after which unfinished processes are stopped and an
            error raised; default none.

    Returns:
        :class:`TrainingLosses`: the losses of every step, with the timings,
        updates per second and test accuracy as attributes.

    Raises:
        ValueError: an unsupported optimizer, device, mode or argument.
        HogwildProcessError: a process raised or died (the others are stopped).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from disttrain import data, models
        >>> from disttrain.strategies import hogwild
        >>> model = models.small_cnn()
        >>> loader = DataLoader(data.digits(train=True), batch_size=32)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        >>> losses = hogwild.train_model(model, loader, 2, 1, opt, log_interval=-1)
        >>> losses.updates_per_second > 0
        True
    """
    if torch.device(device).type != "cpu":
        raise ValueError(f"hogwild: device={device!r} is not supported; Hogwild shares CPU memory (use 'cpu')")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"hogwild: num_processes must be an integer >= 1, got {num_processes!r}")
    if isinstance(epochs_per_process, bool) or not isinstance(epochs_per_process, int) or epochs_per_process < 1:
        raise ValueError(f"hogwild: epochs_per_process must be an integer >= 1, got {epochs_per_process!r}")
    if data not in DATA_MODES:
        raise ValueError(f"hogwild: data={data!r}; choose from {', '.join(DATA_MODES)}")
    if optimizer_state not in STATE_MODES:
        raise ValueError(f"hogwild: optimizer_state={optimizer_state!r}; choose from {', '.join(STATE_MODES)}")
    if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval == 0 or log_interval < -1:
        raise ValueError(f"hogwild: log_interval must be a positive integer or -1 (no logs), got {log_interval!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"hogwild: start_method={start_method!r}; choose from {', '.join(START_METHODS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"hogwild: threads must be an integer >= 1, got {threads!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"hogwild: timeout must be a positive number of seconds or None, got {timeout!r}")
    if threads is not None and threads > 1 and start_method == "fork" and num_processes > 1:
        raise ValueError("hogwild: threads > 1 needs start_method='spawn': a forked process that runs torch on "
                         "several threads after its parent did can hang in the OpenMP runtime")
    kind = _optimizer_kind(optimizer)
    spec = _loader_spec(train_dataloader)
    groups = _flatten_groups(model, optimizer, kind)
    for b in model.buffers():
        b.share_memory_()  # batch-norm statistics are shared (and updated racily) as in model.share_memory()
    samples_seen = torch.zeros(num_processes, len(spec["dataset"]), dtype=torch.int32).share_memory_()
    job = {"model": model, "kind": kind, "groups": groups, "loader": spec, "epochs": epochs_per_process,
           "num_processes": num_processes, "seed": seed, "data": data, "optimizer_state": optimizer_state,
           "loss_fn": loss_fn, "log_interval": log_interval, "samples_seen": samples_seen, "epoch_end": None,
           "threads": threads or (1 if start_method == "fork" else threads_per_process(num_processes))}
    t_spawn = time.perf_counter()
    epochs: list[dict[str, Any]] = []

    def on_epoch(epoch: int, trained: float) -> None:
        assert test_dataloader is not None
        test_loss, test_accuracy = evaluate(model, test_dataloader, loss_fn)
        epochs.append({"epoch": epoch + 1, "seconds": trained, "test_loss": test_loss, "test_accuracy": test_accuracy})
        if log_interval != -1:
            print(f"hogwild: epoch {epoch + 1}: test loss {test_loss:.4f}, accuracy {100 * test_accuracy:.2f}% "
                  f"({trained:.2f} s of training)", flush=True)

    callback = on_epoch if test_dataloader is not None else None
    if num_processes == 1:
        reports = [_run_in_this_process(job, callback, timeout)]
    else:
        reports = _run_processes(job, start_method, timeout, callback)
    out = TrainingLosses()
    merged = sorted((t, loss) for r in reports for t, loss in zip(r["times"], r["losses"]))
    out.extend(loss for _, loss in merged)
    out.elapsed = max(r["seconds"] for r in reports)
    out.updates = sum(r["steps"] for r in reports)
    out.updates_per_second = out.updates / out.elapsed if out.elapsed > 0 else math.inf
    out.per_process = [{k: r[k] for k in ("process", "steps", "samples", "losses", "times", "seconds")}
                       for r in reports]
    out.samples_seen = samples_seen.sum(0, dtype=torch.int32)
    out.test_loss = out.test_accuracy = None
    if optimizer_state == "shared":
        _write_back_state(optimizer, groups)
    out.epochs = epochs
    if epochs:
        out.test_loss, out.test_accuracy = epochs[-1]["test_loss"], epochs[-1]["test_accuracy"]
    if log_interval != -1:
        print(f"hogwild: {num_processes} processes x {epochs_per_process} epochs: {out.updates} updates in "
              f"{out.elapsed:.2f} s ({out.updates_per_second:.0f}/s; {time.perf_counter() - t_spawn:.2f} s with start-up)",
              flush=True)
    if loss_tracker is not None:
        loss_tracker.extend(out)
    return out


def log_elapsed_time(num_processes: int, epochs_per_process: int, start: float, end: float) -> float:
    """Prints and returns the elapsed time of a configuration (``end - start``
    in seconds, e.g. from ``time.perf_counter()``)."""
    elapsed = end - start
    print(f"{num_processes} process(es) x {epochs_per_process} epoch(s) per process: {elapsed:.2f} s", flush=True)
    return elapsed


def chart_losses(losses_dict: Mapping[str, Iterable[Any]],
                 title: str = "Comparing Training Losses Across Configurations", path: str | None = None,
                 smooth: int = 1, log_scale: bool = False, log_time: bool = False) -> Any:
    """Plots each configuration's training losses, one line each, and returns
    the matplotlib figure; saves it too when given ``path`` (the format from its
    extension: .png, .svg, ...).

    Args:
        losses_dict: configuration name -> losses: floats (plotted against the
            step) or ``(seconds, loss)`` pairs (plotted against time).
        title: the figure's title.
        path: where to save the figure (its folder is created).
        smooth: plot the moving average over this many steps.
        log_scale: a logarithmic loss axis.
        log_time: a logarithmic time (or step) axis, for runs of very different lengths.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, works headless and in notebooks

    if not losses_dict:
        raise ValueError("chart_losses: no configurations to plot")
    if smooth < 1:
        raise ValueError(f"chart_losses: smooth must be >= 1, got {smooth}")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    against_time = False
    for name, losses in losses_dict.items():
        values = list(losses)
        if values and isinstance(values[0], (tuple, list)):
            against_time = True
            x = [float(v[0]) for v in values]
            y = [float(v[1]) for v in values]
        else:
            x = list(range(1, len(values) + 1))
            y = [float(v) for v in values]
        if smooth > 1:
            sums = [0.0]
            for v in y:
                sums.append(sums[-1] + v)
            y = [(sums[i + 1] - sums[max(0, i + 1 - smooth)]) / (i + 1 - max(0, i + 1 - smooth)) for i in range(len(y))]
        ax.plot(x, y, label=name, linewidth=1)
    ax.set_xlabel("training time (s)" if against_time else "step (all processes, in the order steps ended)")
    ax.set_ylabel("training loss" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    if log_scale:
        ax.set_yscale("log")
    if log_time:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path)
    return fig
