"""Type stub for the compiled core, disttrain._C (csrc/bindings).

Written by hand from csrc/bindings/*.cpp. tests/test_typing.py checks it against the built
module: ``python -m mypy.stubtest disttrain._C`` (names, classes, bases, properties, variables)
and the signatures pybind11 writes into each docstring (parameters, defaults, return types).
Parameters follow what pybind11 accepts: a ``std::vector`` argument takes any sequence, a
``std::map`` any mapping, a ``std::chrono`` duration a timedelta or float seconds; integer
and floating-point parameters are written ``int`` and ``float``. Parameters bound without
``py::arg`` are positional-only. Returned containers are lists, dicts and tuples.
"""

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, TypedDict

import torch
from torch._C._distributed_c10d import Backend as _C10dBackend
from torch.distributed import ProcessGroup, Store

class _pybind11_type(type):
    """Stands for ``pybind11_builtins.pybind11_type`` (not importable), the metaclass of every
    class the bindings define."""

# csrc/bindings/module.cpp: how the extension was built (`disttrain info` prints it).
class _BuildInfo(TypedDict):
    compiler: str
    cxx_flags: str
    torch_version: str
    cxx11_abi: bool
    cplusplus: int
    nccl: bool  # built with NCCL (decided by CMakeLists.txt)
    nccl_status: str  # why NCCL is or is not in this build
    components: list[str]  # the DISTTRAIN_BINDINGS names, sorted

build_info: _BuildInfo

# csrc/comm: the c10d backend (csrc/bindings/distributed.cpp; disttrain.distributed is its Python face).

# (name, value, source, environment variable); source is "default", "environment" or "options".
_OptionRow = tuple[str, str, str, str]

class ProcessGroupDisttrain(_C10dBackend, metaclass=_pybind11_type):
    """The ``disttrain`` c10d backend (csrc/comm/backend.h)."""

    def __init__(self, store: Store, rank: int, size: int, timeout: timedelta | float,
                 options: Mapping[str, str] = {}) -> None: ...
    @property
    def address(self) -> str:
        """``host:port`` this rank listens on."""
    @property
    def transport(self) -> str:
        """``"shm"``, ``"shm+tcp"`` or ``"tcp"``."""
    @property
    def rejected_connections(self) -> int:
        """Connections dropped since set-up (no or wrong job secret)."""
    @property
    def host_ranks(self) -> int:
        """The group's ranks on this host that share memory with this one; 1 over TCP only."""
    @property
    def caller_thread_ops(self) -> int:
        """Ops run on the caller's thread, not the progress thread (small synchronous all-reduce over shared memory)."""
    @property
    def options(self) -> list[_OptionRow]:  # type: ignore[override]  # the binding shadows c10d Backend.options
        """The resolved comm settings: (name, value, source, environment variable) per setting."""

def comm_options(overrides: Mapping[str, str] = {}) -> list[_OptionRow]:
    """The comm settings a group created now with ``overrides`` would use; raises ValueError on a bad one."""

def reduce_kernel_isa() -> str:
    """Instruction set the reduction kernels dispatch to on this CPU: ``"avx512f"``, ``"avx2"`` or ``"sse2"``."""

"""The shared-memory slot size a group gets by default when a host runs more ranks than a rank's cores."""

# csrc/data: the sampler engine (csrc/bindings/sampler.cpp; disttrain.sampler is its Python face).
class SamplerIndexStream(metaclass=_pybind11_type):
    def __init__(self, dataset_size: int, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool, mode: str, epoch: int, start: int) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def produced(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    def fill(self, out: torch.Tensor) -> int:
        """Writes the next indices into ``out`` (int64); returns how many."""

def sampler_samples_per_rank(dataset_size: int, num_replicas: int, drop_last: bool, start: int) -> int: ...

# csrc/strategies: lock-free optimizer updates for Hogwild (csrc/bindings/hogwild.cpp;
# disttrain.strategies.hogwild is its Python face). Each returns the step number it took.
def hogwild_sgd_update(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                       step: torch.Tensor, lr: float, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, zero_grad: bool) -> int: ...
def hogwild_adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        step: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, maximize: bool, zero_grad: bool) -> int: ...

# csrc/strategies/step_memory: reuse of large CPU blocks inside a training step's thread-local
# scope (csrc/bindings/step_memory.cpp; disttrain.strategies.mpi.GradientAverager is its Python face).
def step_memory_install() -> bool: ...
def step_memory_limits(max_cached_bytes: int, min_bytes: int) -> None: ...
def step_memory_enter() -> None: ...
def step_memory_exit() -> None: ...
def step_memory_depth() -> int: ...
def step_memory_release() -> None: ...
def step_memory_stats() -> dict[str, bool | int]: ...

# csrc/strategies/group_averager: decentralised averaging among peers found at run time
# (csrc/bindings/decentralised.cpp; disttrain.strategies.decentralised is its Python face).
class GroupAverager(metaclass=_pybind11_type):
    def __init__(self, token: bytes, port: int = 0, max_message_bytes: int = 2147483648) -> None: ...
    @property
    def port(self) -> int: ...
    def average(self, vec: torch.Tensor, round: int, group: Sequence[tuple[str, int]], my_index: int,
                weight: float, wire: str, timeout_s: float) -> dict[str, Any]: ...
    # average()'s keys: unreachable (member indices), rejected ((index, reason) pairs), contributors,
    # bytes_sent, bytes_received
    def take_refusals(self) -> list[str]: ...
    def close(self) -> None: ...

# csrc/ddp: the DDP gradient reducer (csrc/bindings/ddp.cpp; disttrain.ddp is its Python face).
class Reducer(metaclass=_pybind11_type):
    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], group: ProcessGroup,
                 bucket_cap_bytes: int, first_bucket_cap_bytes: int, find_unused_parameters: bool,
                 gradient_as_bucket_view: bool, wire_dtype: torch.dtype | None,
                 reduce_on_caller: str = "last") -> None: ...
    def prepare_for_backward(self, outputs: Sequence[torch.Tensor]) -> None: ...
    def discard_unfinished_backward(self) -> None: ...
    def set_fused_sgd(self, settings: Sequence[tuple[float, float, float, float, bool, bool]],
                      buffers: Sequence[torch.Tensor | None], fresh: Sequence[bool]) -> None:
        """Per parameter: (lr, momentum, dampening, weight_decay, nesterov, maximize), its momentum
        buffer (None without momentum), whether that buffer is fresh; empty lists: no fused step."""
    @property
    def fused_steps(self) -> int: ...
    def bucket_plan(self) -> list[list[int]]: ...
    @property
    def rebuilt(self) -> bool: ...
    def last_trace(self) -> dict[str, list[int] | int]:
        """``ready_ns``, ``launch_ns`` and ``done_ns`` (lists, per bucket), ``backward_start_ns``,
        ``backward_end_ns`` and ``finalize_end_ns``."""

def verify_replicas(group: ProcessGroup, params: Sequence[torch.Tensor], names: Sequence[str]) -> None: ...
def broadcast_coalesced(group: ProcessGroup, tensors: Sequence[torch.Tensor], chunk_bytes: int,
                        root: int = 0) -> None: ...
def plan_buckets(bytes: Sequence[int], dtypes: Sequence[torch.dtype], order: Sequence[int], first_cap_bytes: int,
                 cap_bytes: int) -> list[list[int]]:
    """DDP's bucket planner (csrc/ddp/bucket_plan.h): ``order`` grouped into buckets, one dtype each."""

# csrc/trace: the core's timeline (csrc/bindings/trace.cpp; disttrain.trace is its Python face).
def trace_start() -> None: ...
def trace_stop() -> None: ...
def trace_enabled() -> bool: ...
def trace_drain() -> list[tuple[str, str, str, int, int, int, int, int]]:
    """(name, category, phase, start_ns, end_ns, thread, id, bytes) per event recorded; empties the timeline."""
def trace_thread_names() -> list[tuple[int, str]]: ...
def trace_span(category: str, name: str, start_ns: int, end_ns: int, id: int = -1) -> None: ...

# csrc/snapshot: the snapshot format (csrc/bindings/snapshot.cpp; disttrain.snapshot is its Python face).
class CorruptSnapshotError(ValueError):
    """A snapshot file fails its checks; ``tensor`` names the damaged tensor, or is None."""

    path: str
    tensor: str | None

class SnapshotWriteError(OSError):
    """An I/O error while writing a snapshot (``errno``, ``strerror`` and ``filename`` set);
    ``replaced_target``: the new file is in place but its directory's fsync failed."""

    replaced_target: bool

class UnsupportedSnapshotError(ValueError):
    """A snapshot of a format version this build does not read."""

    path: str
    version: int

def snapshot_write(path: str, metadata: bytes, names: Sequence[str], tensors: Sequence[torch.Tensor],
                   fsync: bool = True, fail_after_bytes: int = -1, kill_after_bytes: int = -1,
                   fail_directory_fsync: bool = False) -> int:
    """Writes the snapshot atomically; returns the file's size in bytes."""

def snapshot_read(path: str, /) -> tuple[bytes, list[str], list[torch.Tensor]]:
    """(metadata, names, tensors) of a snapshot file."""

class AsyncSnapshotWriter(metaclass=_pybind11_type):
    def __init__(self) -> None: ...
    def save(self, path: str, metadata: bytes, names: Sequence[str], tensors: Sequence[torch.Tensor],
             remove_after_commit: Sequence[str], fsync: bool = True, fail_after_bytes: int = -1,
             kill_after_bytes: int = -1, copy_in_background: bool = False,
             fail_directory_fsync: bool = False) -> None: ...
    def wait_staged(self) -> None: ...
    def wait(self) -> None: ...
    @property
    def busy(self) -> bool: ...
    @property
    def last_staging_seconds(self) -> float: ...
    @property
    def last_write_seconds(self) -> float: ...

def crc32c(data: bytes, crc: int = 0) -> int: ...
def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int: ...

crc32c_implementation: str  # "sse4.2" or "software": which CRC-32C code this CPU runs

# csrc/shard: the ZeRO engine (csrc/bindings/fsdp.cpp; disttrain.FullyShardedDataParallel is its Python face).
class ShardedUnit(metaclass=_pybind11_type):
    """One unit of a ShardEngine, from ``ShardEngine.unit(index)`` (no Python constructor)."""

    @property
    def names(self) -> list[str]: ...
    @property
    def shapes(self) -> list[list[int]]: ...
    @property
    def numels(self) -> list[int]: ...
    @property
    def total_numel(self) -> int: ...
    @property
    def padded_numel(self) -> int: ...
    @property
    def shard_numel(self) -> int: ...
    @property
    def shard(self) -> torch.Tensor: ...
    @property
    def full(self) -> torch.Tensor: ...
    @property
    def gathered(self) -> bool: ...
    def set_shard(self, param: torch.Tensor) -> None: ...
    @property
    def params(self) -> list[torch.Tensor]: ...
    def gather_copy(self) -> torch.Tensor: ...
    def load_full(self, flat: torch.Tensor) -> None: ...
    def load_shard(self, shard: torch.Tensor) -> None: ...

class ShardEngine(metaclass=_pybind11_type):
    def __init__(self, group: ProcessGroup, stage: int, prefetch: bool, wire_dtype: torch.dtype | None,
                 backward_prefetch: str = "post", lean_backward: bool = False) -> None: ...
    def add_unit(self, params: Sequence[torch.Tensor], names: Sequence[str], is_root: bool,
                 gather_for_backward: bool = True) -> int: ...
    def unit(self, index: int) -> ShardedUnit: ...
    @property
    def num_units(self) -> int: ...
    def begin_forward(self) -> None: ...
    def end_forward(self, backward_follows: bool) -> None: ...
    def pre_forward(self, index: int) -> None: ...
    def post_forward(self, index: int) -> None: ...
    def pre_backward(self, index: int) -> None: ...
    def free_all(self) -> None: ...
    def gather_stale(self) -> None: ...
    def clip_grad_norm(self, max_norm: float, norm_type: float) -> float: ...

def reshard_flat(old_shards: Sequence[torch.Tensor], total_numel: int, new_rank: int,
                 new_world_size: int) -> torch.Tensor: ...
def reshard_sources(total_numel: int, old_world_size: int, new_rank: int, new_world_size: int) -> list[int]: ...

class TensorMemoryTracker(metaclass=_pybind11_type):
    def __init__(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def reset_peak(self) -> None: ...
    @property
    def current_bytes(self) -> int: ...
    @property
    def peak_bytes(self) -> int: ...
