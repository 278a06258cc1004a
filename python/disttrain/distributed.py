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
from ._processes import free_port

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


# --- launch under mpiexec / mpirun / srun (issue 15) ------------------------------------------
# Each launcher names rank, world size and local rank in its own variables; torchrun's win.
# A set is used when its rank and size are both present; one without the other is an error.
_LAUNCHERS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    # (launcher, rank, world size, local rank, local world size)
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
)
# Files naming the job's hosts, first host first (where mpiexec's default mapping puts rank 0).
_HOSTFILE_VARIABLES = ("DISTTRAIN_HOSTFILE", "OMPI_MCA_orte_default_hostfile", "PBS_NODEFILE")
_NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE")
_DERIVED_PORT_BASE, _DERIVED_PORT_SPAN = 20000, 20000


def launch_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Which launcher started this process, and this process's place in the job.

    Reads torchrun's (``RANK``/``WORLD_SIZE``), Open MPI's (``OMPI_COMM_WORLD_*``),
    MPICH's and Intel MPI's (``PMI_RANK``/``PMI_SIZE``, ``MPI_LOCALRANKID``) and
    Slurm's (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``, set by
    ``srun``) variables, in that order: the first complete set wins.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        ``{"launcher", "rank", "world_size", "local_rank", "local_world_size"}``
        (the local values ``None`` when the launcher does not say), or ``None``
        when no launcher started this process.

    Raises:
        ValueError: a launcher's rank without its world size (or the reverse),
            or values that are not whole numbers or out of range.

    Example:
        >>> # under `mpiexec -n 2`, in the second process
        >>> disttrain.distributed.launch_environment()["rank"]
        1
    """
    env = os.environ if environ is None else environ
    for launcher, rank_name, size_name, local_name, local_size_name in _LAUNCHERS:
        have_rank, have_size = env.get(rank_name, "") != "", env.get(size_name, "") != ""
        if launcher == "Slurm" and have_rank and not have_size and env.get("SLURM_NTASKS", "") != "" \
                and env.get("SLURM_STEP_ID", "") != "":
            size_name, have_size = "SLURM_NTASKS", True
        if not (have_rank or have_size):
            continue
        if launcher == "Slurm" and not have_size:
            continue  # an sbatch script itself (no srun step): one process, not a rank of a job
        if have_rank != have_size:
            present, missing = (rank_name, size_name) if have_rank else (size_name, rank_name)
            raise ValueError(f"disttrain.init: {present} is set but {missing} is not; a {launcher} launch "
                             f"sets both (or unset {present} to run as one process)")
        values = {}
        for key, name in (("rank", rank_name), ("world_size", size_name), ("local_rank", local_name),
                          ("local_world_size", local_size_name)):
            raw = env.get(name, "") if name else ""
            try:
                values[key] = int(raw) if raw != "" else None
            except ValueError:
                raise ValueError(f"disttrain.init: {name}={raw!r} is not a whole number") from None
        rank, world_size = values["rank"], values["world_size"]
        assert rank is not None and world_size is not None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"disttrain.init: {rank_name}={rank} is not in [0, {size_name}={world_size})")
        return {"launcher": launcher, **values}
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list: ``"gpu[01-03,07],login1"`` ->
    ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]`` (zero padding kept).

    Raises:
        ValueError: an unbalanced bracket or a range that is not ``a-b`` with ``a <= b``.
    """
    hosts: list[str] = []
    depth, start = 0, 0
    parts = []
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
        if depth < 0 or depth > 1:
            raise ValueError(f"disttrain: cannot read the Slurm node list {nodelist!r} (brackets)")
    if depth != 0:
        raise ValueError(f"disttrain: cannot read the Slurm node list {nodelist!r} (brackets)")
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, rest = part.split("[", 1)
        ranges, suffix = rest.split("]", 1)
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
                raise ValueError(f"disttrain: cannot read the range {item!r} of the Slurm node list {nodelist!r}")
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{n:0{len(low)}d}{suffix}")
    return hosts


def _first_host(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The job's first host and where it was read, from a hostfile or Slurm's node list."""
    for name in _HOSTFILE_VARIABLES:
        path = env.get(name, "")
        if not path:
            continue
        try:
            with open(path) as f:
                for line in f:
                    words = line.split("#", 1)[0].split()
                    if words:  # "host slots=N" (Open MPI), "host:N" (MPICH), "host" (PBS_NODEFILE)
                        host = words[0].rsplit(":", 1)[0] if words[0].count(":") == 1 else words[0]
                        return host, f"{name}={path}"
        except OSError as e:
            raise RuntimeError(f"disttrain.init: cannot read the hostfile {name}={path}: {e.strerror}") from None
        raise RuntimeError(f"disttrain.init: the hostfile {name}={path} names no host")
    for name in _NODELIST_VARIABLES:
        if env.get(name, ""):
            return expand_nodelist(env[name])[0], name
    return None


def _derived_port(env: Mapping[str, str]) -> tuple[int, str] | None:
    """A port every rank computes alike from the job id (so no exchange is needed)."""
    import zlib

    for name in _JOB_ID_VARIABLES:
        job = env.get(name, "")
        if job:
            step = env.get("SLURM_STEP_ID", "") if name == "SLURM_JOB_ID" else ""
            return _DERIVED_PORT_BASE + zlib.crc32(f"{job}.{step}".encode()) % _DERIVED_PORT_SPAN, name
    return None


def _ipv4_interfaces() -> list[tuple[str, str]]:
    """``(address, netmask)`` of each IPv4 interface that is up, loopback last (Linux ioctls)."""
    import fcntl
    import socket
    import struct

    found: list[tuple[str, str]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
                netmask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, request)[20:24])  # SIOCGIFNETMASK
            except OSError:
                continue  # no IPv4 address on this interface
            found.append((address, netmask))
    return sorted(found, key=lambda a: a[0].startswith("127."))


def _reachable_address(candidates: list[tuple[str, str]], mine: list[tuple[str, str]]) -> str:
    """Of rank 0's addresses, the first on a network this process has an address on."""
    import ipaddress

    my_networks = [ipaddress.ip_network(f"{a}/{m}", strict=False) for a, m in mine if not a.startswith("127.")]
    for address, _ in candidates:
        if any(ipaddress.ip_address(address) in net for net in my_networks):
            return address
    if {a for a, _ in candidates} & {a for a, _ in mine}:
        return "127.0.0.1"  # the same host (or rank 0 has loopback only)
    routable = [a for a, _ in candidates if not a.startswith("127.")]
    return routable[0] if routable else "127.0.0.1"


def _exchange_rendezvous(job: dict[str, Any], need_addr: bool, need_port: bool) -> tuple[str | None, int | None]:
    """Rank 0 picks a free port and lists its addresses; mpi4py broadcasts them."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = job["rank"]
    if (comm.Get_rank(), comm.Get_size()) != (rank, job["world_size"]):
        # mpi4py built against another MPI than the launcher's sees a job of its own (often one
        # process): its broadcast would hand rank 0's offer to nobody, and rank 0 would wait out the timeout.
        raise RuntimeError(
            f"disttrain.init: rank {rank} of {job['world_size']} ({job['launcher']}) has no rendezvous address "
            f"(MASTER_ADDR/MASTER_PORT not set), and mpi4py, which would exchange one, sees rank "
            f"{comm.Get_rank()} of {comm.Get_size()}: it is built against another MPI than the one that "
            f"started this job; set MASTER_ADDR and MASTER_PORT, or rebuild mpi4py against this MPI")
    offer = None
    if rank == 0:
        port = free_port("")  # the store listens on every interface
        offer = (_ipv4_interfaces(), port)
    interfaces, port = comm.bcast(offer, root=0)
    address = None
    if need_addr:
        # Rank 0 names its own first routable address: the backend publishes the local
        # address of the route to MASTER_ADDR to its peers, and 127.0.0.1 reaches no other host.
        address = interfaces[0][0] if rank == 0 and interfaces else \
            _reachable_address(interfaces, _ipv4_interfaces())
    return address, port if need_port else None


def _mpi4py_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def _rendezvous_from_launcher(job: dict[str, Any]) -> None:
    """Sets MASTER_ADDR/MASTER_PORT (when absent) for a job mpiexec, mpirun or srun started.

    In order: the environment; the hostfile's (or Slurm node list's) first host,
    or 127.0.0.1 when the launcher's local size is the world size, with a port
    derived from the job id; an exchange through MPI (mpi4py).
    """
    env = os.environ
    need_addr, need_port = env.get("MASTER_ADDR", "") == "", env.get("MASTER_PORT", "") == ""
    if need_addr:
        first = _first_host(env)
        if first is not None:
            env["MASTER_ADDR"], need_addr = first[0], False
        elif job["local_world_size"] == job["world_size"]:  # the launcher says every rank is on this host
            env["MASTER_ADDR"], need_addr = "127.0.0.1", False
    if need_port:
        derived = _derived_port(env)
        if derived is not None and not need_addr:
            env["MASTER_PORT"], need_port = str(derived[0]), False
    if not (need_addr or need_port):
        return
    if not _mpi4py_importable():
        missing = " and ".join(n for n, need in (("MASTER_ADDR", need_addr), ("MASTER_PORT", need_port)) if need)
        raise RuntimeError(
            f"disttrain.init: rank {job['rank']} of {job['world_size']} ({job['launcher']}) has no rendezvous "
            f"address: {missing} not set, no hostfile ({', '.join(_HOSTFILE_VARIABLES)}) or Slurm node list, "
            f"and mpi4py is not installed to exchange one; set MASTER_ADDR and MASTER_PORT, "
            f"or pip install 'disttrain[mpi]'")
    address, port = _exchange_rendezvous(job, need_addr, need_port)
    if address is not None:
        env["MASTER_ADDR"] = address
    if port is not None:
        env["MASTER_PORT"] = str(port)


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
    variables, or those of ``mpiexec``/``mpirun`` (Open MPI's
    ``OMPI_COMM_WORLD_*``, MPICH's ``PMI_*``) and ``srun`` (``SLURM_*``): see
    :func:`launch_environment`. Under an MPI or Slurm launch the rendezvous
    address is ``MASTER_ADDR``/``MASTER_PORT`` when set, else the first host of
    the hostfile (``DISTTRAIN_HOSTFILE``, ``OMPI_MCA_orte_default_hostfile``,
    ``PBS_NODEFILE``) or of Slurm's node list (127.0.0.1 when every rank is on
    this host) with a port derived from the job id, else exchanged through MPI
    when mpi4py is installed; ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` are then set as
    torchrun would. Without any launcher it starts a single-process group, so
    the same script runs alone (docs/mpi.md).

    Args:
        backend: ``"disttrain"`` (default), ``"gloo"`` or ``"nccl"``.
        init_method: any URL torch accepts; default ``env://``.
        rank, world_size: override the environment.
        timeout: group timeout (``timedelta`` or seconds); default 30 minutes.
        options: settings of the ``disttrain`` backend (:class:`BackendOptions`
            or a dict), overriding the environment; only with that backend.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: a launcher's variables are incomplete or out of range.
        RuntimeError: several ranks and no way to find the rendezvous address
            (the message names what is missing).

    Example:
        >>> import disttrain
        >>> rank, world = disttrain.init()
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    job = launch_environment()
    rank = rank if rank is not None else (job["rank"] if job else None)
    world_size = world_size if world_size is not None else (job["world_size"] if job else None)
    if rank is None or world_size is None:
        rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"disttrain.init: rank {rank} is not in [0, {world_size})")
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    if options is not None:
        if backend != BACKEND_NAME:
            raise ValueError(f"disttrain.init: options apply to the {BACKEND_NAME!r} backend, not {backend!r}")
        kwargs["pg_options"] = options if isinstance(options, BackendOptions) else BackendOptions(**options)
    # The variables set here for this job stay only if the group starts: a failed init leaves the
    # environment as it was (a notebook's next try, or the next code in the process, sees no half job).
    before = {name: os.environ.get(name) for name in _INIT_SETS}
    try:
        if job is not None and job["launcher"] != "torchrun":
            _export_torchrun_variables(job, rank, world_size)
            if init_method is None and world_size > 1:
                _rendezvous_from_launcher(job)
        if init_method is None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                if world_size > 1:
                    raise RuntimeError("disttrain.init: MASTER_PORT is not set; launch with torchrun or set "
                                       "MASTER_ADDR/MASTER_PORT")
                os.environ["MASTER_PORT"] = str(free_port())
            init_method = "env://"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    except BaseException:
        for name, value in before.items():  # an empty MASTER_ADDR counts as unset and is replaced: put back too
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        raise
    return rank, world_size


#: what init may set in os.environ: torchrun's variables for an MPI or Slurm job, the rendezvous
_INIT_SETS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _export_torchrun_variables(job: dict[str, Any], rank: int, world_size: int) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them, for the
    code that reads them (the trainer's device choice, a DataLoader's workers)."""
    local_rank = job["local_rank"] if job["local_rank"] is not None else rank
    local_world = job["local_world_size"] if job["local_world_size"] is not None else world_size
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_world)):
        os.environ.setdefault(name, str(value))
