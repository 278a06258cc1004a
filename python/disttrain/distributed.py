"""Process-group set-up: the ``disttrain`` backend and :func:`init`."""

from __future__ import annotations

import atexit
import datetime
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from . import _C

BACKEND_NAME = "disttrain"


class BackendOptions:
    """Settings of the ``disttrain`` backend for one process group.

    Pass as ``pg_options`` to :func:`torch.distributed.init_process_group` or
    :func:`torch.distributed.new_group` (or as ``options`` to :func:`init`); a
    plain ``dict`` works as well. Each setting overrides its environment
    variable for that group only; the table of settings, their defaults and
    scopes is ``docs/settings.md`` and ``disttrain info`` prints the effective
    values. The C++ core parses them once, when the group is created
    (``csrc/comm/options.cpp``).

    Args:
        **settings: setting name -> value, e.g. ``transport="tcp"``,
            ``allreduce_algorithm="ring"``, ``chunk_bytes=262144``.

    Raises:
        ValueError: an unknown setting or a malformed value (checked here, at
            the call site, not later inside the group's creation).

    Example:
        >>> import disttrain, torch.distributed as dist
        >>> dist.init_process_group("disttrain", pg_options=disttrain.BackendOptions(transport="tcp"))
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = _as_text(settings)
        _C.comm_options(self.settings)  # raises ValueError now rather than in every rank's group creation

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"BackendOptions({inner})"


def _as_text(settings: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in settings.items():
        if not isinstance(key, str):
            raise TypeError(f"disttrain: backend option names are strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"disttrain: backend option {key}={value!r} must be a string or an integer")
        out[key] = str(value)
    return out


def _options_dict(options: Any) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, BackendOptions):
        return options.settings
    if isinstance(options, Mapping):
        return _as_text(options)
    raise TypeError(
        f"disttrain: pg_options must be a disttrain.BackendOptions or a dict, got {type(options).__name__}")


def _create_backend(backend_opts, options):
    _register_exit_teardown()
    return _C.ProcessGroupDisttrain(backend_opts.store, backend_opts.group_rank, backend_opts.group_size,
                                    backend_opts.timeout, _options_dict(options))


_exit_teardown_registered = False


def _register_exit_teardown() -> None:
    """Registers :func:`_teardown_at_exit` once, when the first disttrain group is created."""
    global _exit_teardown_registered
    if not _exit_teardown_registered:
        atexit.register(_teardown_at_exit)
        _exit_teardown_registered = True


def _teardown_at_exit() -> None:
    """Destroys the process groups a script left behind, while the interpreter is whole.

    Without it they are destroyed during interpreter finalization, and a backend
    thread that needs the GIL then (gloo's worker releasing its last op's
    tensors, a Python callback on a pending op's future) is ended by Python
    inside a C++ destructor: the process aborts with "terminate called without
    an active exception" after its work is done, and torchrun reports the job
    as failed. Here every backend stops first (gloo joins its workers; disttrain
    fails pending ops with an error naming them; see docs/backend.md).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - exit goes on whatever happens
        warnings.warn(f"disttrain: destroying the process groups at exit failed: {e}", RuntimeWarning, stacklevel=1)


def register_backend() -> None:
    """Registers ``"disttrain"`` with torch.distributed (idempotent)."""
    if hasattr(dist.Backend, BACKEND_NAME.upper()):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu"])


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
    options: BackendOptions | Mapping[str, Any] | None = None,
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
        options: settings of the ``disttrain`` backend (:class:`BackendOptions`
            or a dict), overriding the environment; only with that backend.

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
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    if options is not None:
        if backend != BACKEND_NAME:
            raise ValueError(f"disttrain.init: options apply to the {BACKEND_NAME!r} backend, not {backend!r}")
        kwargs["pg_options"] = options if isinstance(options, BackendOptions) else BackendOptions(**options)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    return rank, world_size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
