"""Process-group set-up: the ``disttrain`` backend and :func:`init`."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from . import _C

BACKEND_NAME = "disttrain"


def _create_backend(store, rank, size, timeout):
    return _C.ProcessGroupDisttrain(store, rank, size, timeout)


def register_backend() -> None:
    """Registers ``"disttrain"`` with torch.distributed (idempotent)."""
    if hasattr(dist.Backend, BACKEND_NAME.upper()):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, devices=["cpu"])


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def init(
    backend: str = BACKEND_NAME,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> tuple[int, int]:
    """Initialises the default process group from the launcher's environment.

    Reads torchrun's (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
    and Open MPI's (``OMPI_COMM_WORLD_RANK``/``SIZE``) variables. Without any of
    them it starts a single-process group, so the same script runs alone.

    Args:
        backend: ``"disttrain"`` (default), ``"gloo"`` or ``"nccl"``.
        init_method: any URL torch accepts; default ``env://``.
        rank, world_size: override the environment.
        timeout: group timeout (``timedelta`` or seconds); default 30 minutes.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> import disttrain
        >>> rank, world = disttrain.init()
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = rank if rank is not None else _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world_size = world_size if world_size is not None else _env_int(
        "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None or world_size is None:
        rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"disttrain.init: rank {rank} is not in [0, {world_size})")
    if init_method is None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError(
                    "disttrain.init: MASTER_PORT is not set; launch with torchrun or set MASTER_ADDR/MASTER_PORT")
            os.environ["MASTER_PORT"] = str(_free_port())
        init_method = "env://"
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    return rank, world_size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
