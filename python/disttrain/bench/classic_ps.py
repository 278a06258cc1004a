"""The classic PyTorch RPC parameter server, run as the benchmark's peer for
:mod:`disttrain.strategies.parameter_server`.

``run_classic_ps(num_trainers)`` reproduces PyTorch's "Implementing a
Parameter Server Using Distributed RPC Framework" tutorial on the digits data
and the small CNN: a ``ParameterServer`` object (created once behind a global
lock) holds the model on rank 0; each trainer (ranks 1..N, its own disjoint
part of the data) runs the model's forward on the server with ``rpc_sync``,
``dist_autograd.backward`` through it, and a ``DistributedOptimizer`` that
updates the server's parameters in place. Several trainers therefore share
one set of parameters and autograd graphs on the server, and one trainer's
in-place step can land between another's forward and backward.

``variant="pull_push"`` is the other common reading of the pattern: trainers
``rpc_sync`` the parameters, compute forward and backward locally and
``rpc_sync`` their gradients back, which the server applies in place (no lock).

The result is whatever happened, measured: elapsed time, steps, final test
accuracy, or the error text of each trainer that failed. It never hangs (RPC
timeout and a deadline for the whole job) and leaves no process behind.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from typing import Any

import torch
from torch import nn

from disttrain._processes import describe_exit, free_port, start_single_threaded, stop

VARIANTS = ("tutorial", "pull_push")

_server: Any = None
_server_lock = threading.Lock()


class ParameterServer(nn.Module):
    """The tutorial's server: the model lives here, trainers call its methods over RPC."""

    def __init__(self, seed: int):
        super().__init__()
        from disttrain import models

        torch.manual_seed(seed)
        self.model = models.small_cnn()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.model(inp)

    def get_param_rrefs(self) -> list:
        from torch.distributed import rpc

        return [rpc.RRef(p) for p in self.model.parameters()]

    def get_params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def apply_gradients(self, grads: list[torch.Tensor], lr: float) -> None:
        with torch.no_grad():
            for p, g in zip(self.model.parameters(), grads):
                p.add_(g, alpha=-lr)  # in place, no lock: as in the pattern


def get_parameter_server(seed: int) -> ParameterServer:
    global _server
    with _server_lock:
        if _server is None:
            _server = ParameterServer(seed)
        return _server


def _call(method, rref, *args):
    return method(rref.local_value(), *args)


def _remote_method(method, rref, *args):
    from torch.distributed import rpc

    return rpc.rpc_sync(rref.owner(), _call, args=(method, rref) + args)


def _train(rank: int, num_trainers: int, epochs: int, batch_size: int, lr: float, seed: int, variant: str) -> dict:
    import torch.distributed.autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    from disttrain import data, models
    from disttrain.strategies.parameter_server import worker_indices

    dataset = data.digits(train=True)
    server = rpc.remote("parameter_server", get_parameter_server, args=(seed,))
    local = models.small_cnn() if variant == "pull_push" else None
    opt = None
    if variant == "tutorial":
        opt = DistributedOptimizer(torch.optim.SGD, _remote_method(ParameterServer.get_param_rrefs, server), lr=lr)
    steps = 0
    start = time.perf_counter()
    error = None
    try:
        for epoch in range(epochs):
            order = worker_indices(len(dataset), num_trainers, rank - 1, epoch, seed)
            for i in range(0, len(order), batch_size):
                x, y = dataset[order[i:i + batch_size]]
                if variant == "tutorial":
                    assert opt is not None
                    with dist_autograd.context() as cid:
                        out = _remote_method(ParameterServer.forward, server, x)
                        loss = nn.functional.cross_entropy(out, y)
                        dist_autograd.backward(cid, [loss])
                        opt.step(cid)
                else:
                    assert local is not None
                    params = _remote_method(ParameterServer.get_params, server)
                    with torch.no_grad():
                        for p, v in zip(local.parameters(), params):
                            p.copy_(v)
                    local.zero_grad()
                    nn.functional.cross_entropy(local(x), y).backward()
                    _remote_method(ParameterServer.apply_gradients, server,
                                   [p.grad for p in local.parameters()], lr)
                steps += 1
    except Exception as e:  # noqa: BLE001 - the outcome is the measurement
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return {"steps": steps, "elapsed": time.perf_counter() - start, "error": error}


def _rank_main(rank: int, world_size: int, port: int, args: tuple, timeout: float, results) -> None:
    try:
        torch.set_num_threads(1)
        from torch.distributed import rpc

        options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=timeout,
                                                  num_worker_threads=8)
        name = "parameter_server" if rank == 0 else f"trainer_{rank}"
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
        value: dict[str, Any] = {}
        if rank > 0:
            value = _train(rank, world_size - 1, *args)
        rpc.shutdown()  # graceful: waits for every rank
        if rank == 0 and _server is not None:
            value = {"state": {k: v.numpy() for k, v in _server.model.state_dict().items()}}
        results.put(("ok", rank, value))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", rank, traceback.format_exc()))


def run_classic_ps(num_trainers: int, epochs: int = 1, batch_size: int = 32, lr: float = 0.05, *,
                   variant: str = "tutorial", timeout: float = 60.0, seed: int = 42) -> dict[str, Any]:
    """Runs the PyTorch RPC parameter-server pattern with ``num_trainers``
    trainers (plus one server process) on the digits data and the small CNN.

    Args:
        num_trainers: trainer processes; each trains on its own disjoint part of the data.
        epochs, batch_size, lr: training settings (plain SGD, as the tutorial).
        variant: ``"tutorial"`` (remote forward, distributed autograd,
            ``DistributedOptimizer``) or ``"pull_push"`` (local forward and backward,
            gradients pushed back and applied in place).
        timeout: RPC timeout; the whole job is stopped after ``timeout + 30`` s.
        seed: model initialisation and data order.

    Returns:
        ``{"pattern", "variant", "trainers", "elapsed_s", "steps", "steps_per_s",
        "final_accuracy", "error", "errors"}``: ``error`` is None when every trainer
        finished, else the first trainer's error text (``errors`` holds all of them, by rank).

    Example:
        >>> run_classic_ps(2)["error"]
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(num_trainers, bool) or not isinstance(num_trainers, int) or num_trainers < 1:
        raise ValueError(f"num_trainers must be an integer >= 1, got {num_trainers!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = num_trainers + 1
    port = free_port()
    args = (epochs, batch_size, lr, seed, variant)
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, timeout, results), daemon=True)
             for r in range(world)]
    start_single_threaded(procs)
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout + 30
    try:
        while len(outcome) < world and time.monotonic() < deadline:
            try:
                status, rank, value = results.get(timeout=0.2)
                outcome[rank] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    time.sleep(0.3)
                    while not results.empty():
                        status, rank, value = results.get()
                        outcome[rank] = (status, value)
                    break
    finally:
        stop(procs, grace=2)
        results.close()
        results.join_thread()
    errors: dict[int, str] = {}
    for r in range(world):
        code = procs[r].exitcode
        status, value = outcome.get(r, ("error", "did not finish before the deadline (stopped)"
                                       if code is None or code < 0 else f"{describe_exit(code)} without reporting"))
        if status != "ok":
            errors[r] = str(value).strip().splitlines()[-1]
        elif r > 0 and value.get("error"):
            errors[r] = value["error"]
    trainers = [outcome[r][1] for r in range(1, world) if outcome.get(r, ("",))[0] == "ok"]
    steps = sum(t["steps"] for t in trainers)
    elapsed = max((t["elapsed"] for t in trainers), default=float("nan"))
    accuracy = None
    server = outcome.get(0)
    if server and server[0] == "ok" and "state" in server[1]:
        from torch.utils.data import DataLoader

        from disttrain import data, models
        from disttrain.strategies.parameter_server import evaluate

        model = models.small_cnn()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in server[1]["state"].items()})
        accuracy = evaluate(model, DataLoader(data.digits(train=False), batch_size=512))
    return {"pattern": "torch.distributed.rpc parameter server", "variant": variant, "trainers": num_trainers,
            "elapsed_s": elapsed, "steps": steps, "steps_per_s": steps / elapsed if elapsed and elapsed > 0 else None,
            "final_accuracy": accuracy, "error": next(iter(errors.values()), None),
            "errors": {r: errors[r] for r in sorted(errors)}}


if __name__ == "__main__":
    import json
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for v in VARIANTS:
        print(json.dumps(run_classic_ps(n, variant=v), default=str))
