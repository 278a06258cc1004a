"""MPI-style training and a pipelined evaluation, for jobs started by ``mpiexec``.

The mpi4py recipe HPC users write (scatter the data set's file names, broadcast
the parameters from rank 0, ``comm.Allreduce`` every gradient through numpy,
rank 0 saves a checkpoint) as a small API over ``torch.distributed`` and the
``disttrain`` backend: :func:`scatter_files`, :func:`broadcast_parameters`,
:class:`GradientAverager` (one fused all-reduce per step, no numpy round trip),
:func:`save_checkpoint` / :func:`load_checkpoint` (the snapshot format,
``disttrain.snapshot``). :func:`pipeline` runs an evaluation as a chain of
stages on ranks (read -> resize -> normalise -> predict), the last stage
replicated over the remaining ranks.

Nothing here needs mpi4py: ``disttrain.init()`` reads mpiexec's, mpirun's and
srun's variables (docs/mpi.md). The collectives run in the backend
(``csrc/comm``); this module only arranges them.

Note [pipeline messages]: the backend executes a group's operations in issue
order on one progress thread and has no receive from any source. So every edge
between two ranks gets groups of its own, each used by one thread of each rank
in one direction: a data group (items, upstream -> downstream) and a credit
group (credits, downstream -> upstream). A data message is one transfer: a
16-word header (kind, index, payload bytes, dtype, shape) and the payload after
it. Since a receive must name its size, both sides keep the size of the next
message: it starts at the header's, an item of another size is preceded by a
resize message of the old size that names the new one, and an end or error
message is padded to it (or resized first when longer). Items of one shape,
the usual case, cost one transfer each. Every receive names its source: the
replicas of the last stage are fed round-robin (item k to replica k mod R) and
their results come back to rank 0 on one group per replica. Each channel ends
with exactly one terminal message (end or error), so every thread that reads a
channel stops, and an error reaches every rank, whichever stage raised.

Note [pipeline transfers]: where a pipeline's time went on the 2-core benchmark
VM (4 ranks, docs/mpi.md). (1) Page faults: the predict rank took ~480 minor
faults per image (about 2 MB of its activations mapped afresh every item: glibc
gave the memory back and faulted it in again, where the one-rank loop's heap
settled after its first round), ~1 ms of CPU per image; each stage call therefore
runs in a step-memory scope (csrc/strategies/step_memory.h), which keeps the
blocks of 1 MiB or more for the next item. (2) Transfers: the backend runs
send/recv over TCP even between ranks of one host (a kernel copy on each side:
~0.6 + 0.4 ms of CPU per 0.9 MB image, two ranks alone), while a broadcast in a
two-rank group takes its shared-memory path (~0.23 ms each side, most of it
waiting): ``transfer="broadcast"`` sends an item as a broadcast rooted at the
sender. In the 4-rank pipeline on 2 busy cores it saved no CPU (its waits yield
the core in a loop before they sleep; total CPU per image 9.4-12.9 ms against
9.2-10.6 ms with send/recv, same jobs), so ``"sendrecv"`` stays the default.
(3) Messages: an item is one transfer (header and payload), Note [pipeline messages].
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import _C, snapshot
from .._parallel import average_coalesced, default_group

__all__ = ["scatter_files", "broadcast_parameters", "GradientAverager", "save_checkpoint", "load_checkpoint",
           "image_files", "read_image", "write_digits_folder", "pipeline", "PipelineError", "PipelineResult",
           "StageStats"]


# --- training: scatter, broadcast, all-reduce, checkpoint ----------------------------------------

def _group_size_rank(group: Any) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("disttrain.strategies.mpi: no process group; call disttrain.init() first "
                           "(under mpiexec, mpirun, srun or torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def scatter_files(files: Sequence[str], src: int = 0, group: Any = None) -> list[str]:
    """This rank's share of a data set's files, scattered evenly from rank ``src``.

    Rank ``src``'s list is the one used (the other ranks may pass anything, e.g.
    ``[]``); it is cut into ``world_size`` contiguous parts whose lengths differ
    by at most one, in order (like ``numpy.array_split``), and rank ``r`` gets
    part ``r``.

    Args:
        files: the file names (rank ``src``'s matter).
        src: the rank whose list is scattered.
        group: process group (default: the whole job).

    Returns:
        This rank's files.

    Raises:
        ValueError: fewer files than ranks (on every rank).

    Example:
        >>> files = sorted(glob.glob("data/*/*.png")) if rank == 0 else []
        >>> mine = scatter_files(files)
    """
    world, rank = _group_size_rank(group)
    box: list[Any] = [list(files) if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    everything: list[str] = box[0]
    if len(everything) < world:
        raise ValueError(f"scatter_files: {len(everything)} file(s) cannot be scattered over {world} ranks; "
                         f"give at least one file per rank or run fewer ranks")
    base, extra = divmod(len(everything), world)
    start = rank * base + min(rank, extra)
    return everything[start:start + base + (1 if rank < extra else 0)]


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module.parameters(), *module.buffers()]]


def broadcast_parameters(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Makes every rank's parameters and buffers equal to rank ``src``'s, in one broadcast.

    Args:
        module: the model (same architecture on every rank).
        src: the rank whose values are kept.
        group: process group (default: the whole job).

    Raises:
        ValueError: the ranks' models differ in size (names the sizes).

    Example:
        >>> broadcast_parameters(model)   # after building the model, before training
    """
    _group_size_rank(group)
    tensors = [t for t in _state_tensors(module) if t.is_floating_point()]
    sizes = torch.tensor([sum(t.numel() for t in tensors)], dtype=torch.int64)
    smallest, largest = sizes.clone(), sizes.clone()
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    if smallest.item() != largest.item():
        raise ValueError(f"broadcast_parameters: the ranks' models differ ({smallest.item()} to {largest.item()} "
                         f"floating-point values); build the same model on every rank")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for same in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in same])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class GradientAverager:
    """Averages the gradients over the ranks with ONE all-reduce per step.

    One coalesced all-reduce (``AVG``) of every gradient: on one host the
    backend's shared-memory path reads and writes the gradient tensors where
    they are (no flat copy in or out, no numpy arrays); across hosts it packs
    them into one message. This replaces the mpi4py recipe's loop of
    ``comm.Allreduce`` per gradient through numpy.

    :meth:`zero_grad` (use it instead of ``optimizer.zero_grad()``) drops the
    gradients, so backward writes each one once, as it computes it (no
    accumulation into a buffer: an extra pass over every gradient), and opens a
    step-memory scope on this thread until the all-reduce: the large blocks
    backward allocates (the gradients) are taken from blocks freed by the step
    before, so their memory pages are mapped once, not every step (a fresh
    37 MB gradient costs 17 ms of CPU in page faults on the benchmark VM;
    ``disttrain._C.step_memory_*``, csrc/strategies/step_memory.h). Only memory
    management differs: the gradients are the same bits.

    ``overlap=True`` splits the all-reduce into buckets of about
    ``bucket_bytes`` (parameters in reverse order, the order backward produces
    their gradients) and launches each bucket's coalesced all-reduce from a
    gradient hook as soon as its last gradient is written, so the transfers
    run on the backend's progress thread while backward computes the rest;
    :meth:`__call__` then launches what is left and waits. Buckets are
    launched in the same order on every rank. The values are the same as with
    one all-reduce (each element is averaged the same way).

    Args:
        module: the model, or an iterable of its parameters.
        group: process group (default: the whole job).
        reuse_memory: reuse the step's large blocks as described (default True);
            False leaves memory to torch's allocator.
        overlap: all-reduce buckets during backward (default False: one
            all-reduce after it).
        bucket_bytes: bytes of gradients per bucket with ``overlap`` (the first
            bucket, the last layers' gradients, is at most 1 MiB so that the
            first transfer starts early).

    Raises:
        ValueError: parameters of more than one dtype or device.

    Example:
        >>> average = GradientAverager(model)
        >>> average.zero_grad(); loss_fn(model(x), y).backward(); average(); optimizer.step()
    """

    # Blocks smaller than this are left to the allocator (glibc serves them
    # from its heap without new page faults after the first steps).
    REUSE_MIN_BYTES = 1 << 20

    def __init__(self, module: nn.Module | Iterable[nn.Parameter], group: Any = None, reuse_memory: bool = True,
                 overlap: bool = False, bucket_bytes: int = 8 << 20):
        params = module.parameters() if isinstance(module, nn.Module) else module
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientAverager: the model has no parameter that requires a gradient")
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"GradientAverager: parameters of one dtype and device are expected, got {sorted(map(str, kinds))}")
        self.group = group
        self.world_size, _ = _group_size_rank(group)
        self.reuse_memory = bool(reuse_memory) and self.params[0].device.type == "cpu"
        self._scope_thread: int | None = None  # the thread whose step-memory scope is open
        if self.reuse_memory:
            nbytes = sum(p.numel() * p.element_size() for p in self.params)
            # Room for one step's gradients and as much again (activations, temporaries).
            _C.step_memory_limits(2 * nbytes, self.REUSE_MIN_BYTES)
            self.reuse_memory = _C.step_memory_install()
        self.overlap = bool(overlap) and self.world_size > 1
        self._buckets: list[list[int]] = []  # parameter indices, in launch order
        self._bucket_of: list[int] = []      # parameter index -> bucket
        self._pending: list[int] = []        # per bucket: gradients not yet written this step
        self._works: list[Any] = []          # per bucket launched this step, in order
        self._hooks: list[Any] = []
        if self.overlap:
            if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
                raise ValueError(f"GradientAverager: bucket_bytes must be a whole number >= 1, got {bucket_bytes!r}")
            self._plan_buckets(bucket_bytes)
            for i, p in enumerate(self.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i)))
            self._pending = [len(b) for b in self._buckets]

    def _plan_buckets(self, bucket_bytes: int) -> None:
        # DDP's planner (csrc/ddp/bucket_plan.h), in the order backward writes the gradients.
        self._buckets = _C.plan_buckets([p.numel() * p.element_size() for p in self.params],
                                        [p.dtype for p in self.params], list(reversed(range(len(self.params)))),
                                        min(1 << 20, bucket_bytes), bucket_bytes)
        self._bucket_of = [0] * len(self.params)
        for b, members in enumerate(self._buckets):
            for i in members:
                self._bucket_of[i] = b

    def _grad_ready(self, index: int, param: torch.Tensor) -> None:
        b = self._bucket_of[index]
        if b < len(self._works):
            raise RuntimeError("GradientAverager(overlap=True): a gradient was written again after its bucket's "
                               "all-reduce started; call the averager after each backward (gradient accumulation "
                               "over several backward passes needs overlap=False)")
        self._pending[b] -= 1
        # Launch in bucket order only: every rank issues the same sequence of collectives.
        while len(self._works) < len(self._buckets) and self._pending[len(self._works)] <= 0:
            self._launch(len(self._works))

    @staticmethod
    def _gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The parameters' gradients; a missing one is set to zeros (it counts as zero)."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    def _launch(self, b: int) -> None:
        grads = self._gradients([self.params[i] for i in self._buckets[b]])
        self._works.append(average_coalesced(default_group("GradientAverager", self.group), grads))

    def zero_grad(self) -> None:
        """Drops the gradients (use it instead of ``optimizer.zero_grad()``) and opens this
        thread's step-memory scope: backward then writes each gradient once, into memory the
        previous step used. The scope closes in :meth:`__call__`."""
        for p in self.params:
            p.grad = None
        if self.reuse_memory and self._scope_thread is None:
            _C.step_memory_enter()
            self._scope_thread = threading.get_ident()

    def _close_scope(self) -> None:
        if self._scope_thread is not None and self._scope_thread == threading.get_ident():
            _C.step_memory_exit()
            self._scope_thread = None

    def __call__(self) -> None:
        """All-reduces (averages) the current gradients in place; a missing gradient counts as zero."""
        try:
            with torch.no_grad():
                if self.overlap:
                    # The buckets backward did not complete (unused parameters, a step without
                    # zero_grad), then every transfer's end.
                    while len(self._works) < len(self._buckets):
                        self._launch(len(self._works))
                    for work in self._works:
                        work.wait()
                    return
                grads = self._gradients(self.params)
                if self.world_size > 1:
                    # Synchronous: on this thread where the backend can, inside its step-memory scope.
                    average_coalesced(default_group("GradientAverager", self.group), grads, async_op=False).wait()
        finally:
            if self.overlap:
                self._works = []
                self._pending = [len(b) for b in self._buckets]
            self._close_scope()

    def close(self) -> None:
        """Removes the gradient hooks of ``overlap=True`` (backward then no longer starts
        all-reduces); waits for transfers still in flight first."""
        for work in self._works:
            work.wait()
        self._works = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.overlap = False

    @staticmethod
    def memory_stats() -> dict[str, Any]:
        """The step memory's counters (process-wide): ``installed``, ``reused`` and ``fresh``
        (scoped allocations served from a free block / newly), ``cached_bytes``, ``live_bytes``,
        ``max_cached_bytes``, ``min_bytes``."""
        return dict(_C.step_memory_stats())

    @staticmethod
    def release_memory() -> None:
        """Frees the step memory's free blocks (blocks in use are freed when their tensors die)."""
        _C.step_memory_release()


def save_checkpoint(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    step: int = 0, extra: dict[str, Any] | None = None, group: Any = None) -> str | None:
    """Rank 0 writes model, optimizer and step to ``path`` in the snapshot format.

    The write is atomic (temporary file, fsync, rename; ``disttrain.snapshot.save``).
    Every rank calls it; the others wait at a barrier until the file is complete.

    Args:
        path: the checkpoint file (``.dts``); its folder is created.
        module: the model (equal on every rank after training steps).
        optimizer: its optimizer, or None.
        step: a step count kept in the file.
        extra: more picklable state kept in the file.
        group: process group (default: the whole job).

    Returns:
        ``path`` on rank 0, None elsewhere.

    Example:
        >>> save_checkpoint("runs/mpi/checkpoint.dts", model, optimizer, step=step)
    """
    _, rank = _group_size_rank(group)
    written = None
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {"model": module.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                 "step": step, "extra": extra or {}}
        snapshot.save(path, state)
        written = str(path)
    dist.barrier(group=group)
    return written


def load_checkpoint(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    group: Any = None) -> dict[str, Any] | None:
    """Rank 0 reads a checkpoint of :func:`save_checkpoint` and every rank gets it.

    Only rank 0 needs to see the file (no shared file system needed).

    Args:
        path: the checkpoint file.
        module, optimizer: loaded in place (optimizer only when given).
        group: process group (default: the whole job).

    Returns:
        ``{"step", "extra"}`` of the checkpoint, or None when rank 0 finds no file
        (then nothing is loaded, on any rank).

    Raises:
        disttrain.snapshot errors: a corrupt file (on rank 0; the other ranks then
        fail at their next collective).

    Example:
        >>> state = load_checkpoint("runs/mpi/checkpoint.dts", model, optimizer)
        >>> start = state["step"] if state else 0
    """
    _, rank = _group_size_rank(group)
    box: list[Any] = [None]
    if rank == 0 and os.path.exists(path):
        box[0] = snapshot.load(path)
    dist.broadcast_object_list(box, src=0, group=group)
    state = box[0]
    if state is None:
        return None
    module.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return {"step": state["step"], "extra": state["extra"]}


# --- image files ---------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pt", ".npy")


def image_files(root: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path, label)`` of every image under ``root/<class>/``, sorted; labels index the sorted class folders.

    Raises:
        FileNotFoundError: ``root`` has no class folder with images (names the suffixes accepted).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    found = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under '{root}'")
    return found


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a ``(C, H, W)`` uint8 tensor: PNG/JPEG/BMP/PPM through PIL, or a
    saved tensor (``.pt``) or array (``.npy``) of that layout."""
    path = os.fspath(path)
    if path.endswith(".pt"):
        return torch.load(path)
    if path.endswith(".npy"):
        import numpy as np

        return torch.from_numpy(np.load(path))
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image))  # one copy out of PIL
    return (pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)).contiguous()


def write_digits_folder(root: str | os.PathLike, limit: int | None = None) -> list[tuple[str, int]]:
    """Writes scikit-learn's digits (disttrain.data.digits, train split) as one grey
    8x8 PNG per image under ``root/<digit>/`` (``.pt`` files when PIL is missing),
    once; returns :func:`image_files` of it. An image-folder data set with no download.
    """
    from ..data import digits

    root = os.fspath(root)
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        images, labels = digits(True).tensors
        try:
            from PIL import Image
            have_pil = True
        except ImportError:
            have_pil = False
        for i in range(len(labels) if limit is None else min(limit, len(labels))):
            folder = os.path.join(root, str(int(labels[i])))
            os.makedirs(folder, exist_ok=True)
            pixels = (images[i] * 255).round().to(torch.uint8)  # (1, 8, 8)
            if have_pil:
                Image.fromarray(pixels[0].numpy()).save(os.path.join(folder, f"{i:05d}.png"))
            else:
                torch.save(pixels, os.path.join(folder, f"{i:05d}.pt"))
        open(done, "w").close()
    return image_files(root)


# --- pipelined evaluation ---------------------------------------------------------------------

class PipelineError(RuntimeError):
    """A pipeline stage raised; every rank of the pipeline raises this with the same message."""


@dataclasses.dataclass
class StageStats:
    """What one rank of a pipeline did.

    Attributes:
        rank: the rank.
        stage: index of its stage; name: the stage's name.
        items: items it processed.
        busy_seconds: time inside the stage function.
        wall_seconds: time from its first to its last item.
        items_per_second: ``items / busy_seconds`` (the stage's own throughput).
        blocked_seconds: time waiting for a credit (back-pressure from downstream).
        starved_seconds: time waiting for an item from upstream.
        queue_mean, queue_max: items waiting in its input queue when it took one
            (received, not yet processed; at most ``queue_depth``).
    """

    rank: int
    stage: int
    name: str
    items: int = 0
    busy_seconds: float = 0.0
    wall_seconds: float = 0.0
    items_per_second: float = 0.0
    blocked_seconds: float = 0.0
    starved_seconds: float = 0.0
    queue_mean: float = 0.0
    queue_max: int = 0


@dataclasses.dataclass
class PipelineResult:
    """Outputs (rank 0 only: the last stage's outputs in input order, else None),
    per-rank statistics (every rank), and the wall time on this rank."""

    outputs: list[torch.Tensor] | None
    stats: list[StageStats]
    seconds: float

    def report(self) -> str:
        """A table of the per-stage throughput and queue occupancy."""
        lines = [f"{'rank':>4} {'stage':<16} {'items':>6} {'items/s':>9} {'busy s':>7} {'blocked s':>9} "
                 f"{'starved s':>9} {'queue mean':>10} {'max':>4}"]
        for s in self.stats:
            lines.append(f"{s.rank:>4} {f'{s.stage}:{s.name}':<16} {s.items:>6} {s.items_per_second:>9.1f} "
                         f"{s.busy_seconds:>7.2f} {s.blocked_seconds:>9.2f} {s.starved_seconds:>9.2f} "
                         f"{s.queue_mean:>10.2f} {s.queue_max:>4}")
        return "\n".join(lines)


_ITEM, _END, _ERROR, _RESIZE = 0, 1, 2, 3
_TRANSFERS = ("broadcast", "sendrecv")
# Free blocks the step memory keeps for a pipeline's stages (process-wide; see reuse_memory).
PIPELINE_CACHE_BYTES = 64 << 20
_HEADER = 16  # int64 words: kind, index, nbytes, dtype code, ndim, shape (up to 11 dims)
_HEADER_BYTES = 8 * _HEADER
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool]


class _Stop(Exception):
    """The pipeline stopped on this rank (own error or one received); the message is the error."""


class _Channel:
    """One direction of one edge: a two-rank group used by one thread of each side.

    ``transfer="broadcast"``: a message is a broadcast in the two-rank group rooted at the
    sender (the backend's shared-memory path on one host, TCP across hosts); ``"sendrecv"``:
    ``isend``/``recv`` (TCP, also on one host). See Note [pipeline transfers].
    """

    def __init__(self, group: Any, peer: int, transfer: str = "sendrecv"):
        self.group, self.peer = group, peer
        self.broadcast = transfer == "broadcast"
        self.me = dist.get_rank()
        self.closed = False  # this side sent its terminal message
        # Bytes of the next message on a data channel, the same on both sides (Note [pipeline messages]).
        self.expected = _HEADER_BYTES
        # Sends are asynchronous (the stage computes its next item meanwhile); their tensors live
        # here until the backend completed them, in issue order. Credits bound how many there are.
        self.in_flight: collections.deque = collections.deque()

    def _recv(self, tensor: torch.Tensor) -> None:
        if self.broadcast:
            dist.broadcast(tensor, self.peer, group=self.group)
        else:
            dist.recv(tensor, self.peer, group=self.group)

    def _send(self, tensor: torch.Tensor) -> None:
        if self.broadcast:
            work = dist.broadcast(tensor, self.me, group=self.group, async_op=True)
        else:
            work = dist.isend(tensor, self.peer, group=self.group)
        assert work is not None  # this rank is in the group
        self.in_flight.append((work, tensor))
        while self.in_flight and self.in_flight[0][0].is_completed():
            self.in_flight.popleft()[0].wait()  # raises a failed send's error

    def flush(self) -> None:
        """Waits for every send of this channel (raises the first failure)."""
        while self.in_flight:
            self.in_flight.popleft()[0].wait()

    def send_message(self, kind: int, index: int = 0, tensor: torch.Tensor | None = None,
                     text: str = "") -> None:
        """One message: the header and the payload in one transfer of the size the receiver
        expects (Note [pipeline messages]); a size change is announced first."""
        words = [kind, index, 0, 0, 0] + [0] * (_HEADER - 5)
        payload = None
        if tensor is not None:
            if tensor.dim() > _HEADER - 5 or tensor.dtype not in _DTYPES:
                raise TypeError(f"pipeline: cannot send a tensor of shape {tuple(tensor.shape)} and dtype "
                                f"{tensor.dtype}")
            payload = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            words[3], words[4] = _DTYPES.index(tensor.dtype), tensor.dim()
            words[5:5 + tensor.dim()] = tensor.shape
        elif text:
            payload = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        nbytes = payload.numel() if payload is not None else 0
        words[2] = nbytes
        size = _HEADER_BYTES + nbytes
        # An item is sent at its exact size; a terminal message is padded to the expected one when it fits.
        if size != self.expected and (kind == _ITEM or size > self.expected):
            resize = torch.zeros(self.expected, dtype=torch.uint8)
            resize[:_HEADER_BYTES].view(torch.int64)[:3] = torch.tensor([_RESIZE, index, size])
            self._send(resize)
            self.expected = size
        message = torch.empty(self.expected, dtype=torch.uint8)
        message[:_HEADER_BYTES].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))
        if payload is not None and nbytes > 0:
            message[_HEADER_BYTES:size].copy_(payload)
        self._send(message)
        if kind != _ITEM:
            self.closed = True
            self.flush()

    def recv_message(self) -> tuple[int, int, Any]:
        """``(kind, index, tensor or error text or None)``."""
        while True:
            message = torch.empty(self.expected, dtype=torch.uint8)
            self._recv(message)
            words = message[:_HEADER_BYTES].view(torch.int64).tolist()
            kind, index, nbytes = words[0], words[1], words[2]
            if kind != _RESIZE:
                break
            self.expected = nbytes  # the next message's size
        payload = message[_HEADER_BYTES:_HEADER_BYTES + nbytes]
        if kind == _ERROR:
            return kind, index, bytes(payload.numpy()).decode(errors="replace")
        if kind == _END:
            return kind, index, None
        # A view of the message (the header stays with it): no copy.
        return kind, index, payload.view(_DTYPES[words[3]]).reshape(words[5:5 + words[4]])

    def send_credit(self, credit: int, text: str = "") -> None:
        """credit > 0: room for that many items; 0: end; < 0: error, ``text`` follows."""
        payload = text.encode()
        self._send(torch.tensor([credit if credit >= 0 else -max(1, len(payload))], dtype=torch.int64))
        if credit < 0:
            self._send(torch.frombuffer(bytearray(payload or b"?"), dtype=torch.uint8))
        if credit <= 0:
            self.closed = True
            self.flush()

    def recv_credit(self) -> tuple[int, str]:
        box = torch.empty(1, dtype=torch.int64)
        self._recv(box)
        credit = int(box.item())
        if credit >= 0:
            return credit, ""
        text = torch.empty(-credit, dtype=torch.uint8)
        self._recv(text)
        return credit, bytes(text.numpy()).decode(errors="replace")


class _Rank:
    """The threads and channels of one rank of a pipeline."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()  # (index, tensor) or None (a channel ended); bounded by credits
        self.queued = 0  # items in the inbox (the Nones that wake the main thread not counted)
        self.threads: list[threading.Thread] = []
        self.credits: dict[int, threading.Semaphore] = {}  # per outbound channel (by peer)

    def fail(self, text: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = text
        self.inbox.put(None)  # wakes the main thread
        for s in self.credits.values():
            s.release()

    def check(self) -> None:
        if self.error is not None:
            raise _Stop(self.error)

    def start(self, target: Callable[[], None]) -> None:
        def body() -> None:
            try:
                target()
            except Exception as e:  # noqa: BLE001 - a broken channel stops the pipeline on this rank
                self.fail(f"pipeline: communication failed on rank {dist.get_rank()}: {e}")
        t = threading.Thread(target=body, daemon=True)
        t.start()
        self.threads.append(t)

    def receive_items(self, channel: _Channel) -> None:
        while True:
            kind, index, value = channel.recv_message()
            if kind == _ITEM:
                with self.lock:
                    self.queued += 1
                self.inbox.put((index, value))
                continue
            if kind == _ERROR:
                self.fail(value)
            self.inbox.put(None)
            return

    def collect_results(self, channel: _Channel, outputs: dict[int, torch.Tensor]) -> None:
        while True:
            kind, index, value = channel.recv_message()
            if kind == _ITEM:
                outputs[index] = value
                continue
            if kind == _ERROR:
                self.fail(value)
            return

    def receive_credits(self, channel: _Channel) -> None:
        semaphore = self.credits[channel.peer]
        while True:
            credit, text = channel.recv_credit()
            if credit > 0:
                for _ in range(credit):
                    semaphore.release()
                continue
            if credit < 0:
                self.fail(text)
            return

    def take_credit(self, peer: int, stats: StageStats) -> None:
        started = time.perf_counter()
        self.credits[peer].acquire()
        stats.blocked_seconds += time.perf_counter() - started
        self.check()


def _quietly(send: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """A terminal message on the error path: a peer that is gone already needs none."""
    try:
        send(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the error being reported is the one that matters
        pass


def _stage_names(stages: Sequence[Any]) -> list[tuple[str, Callable[[Any], Any]]]:
    named = []
    for i, stage in enumerate(stages):
        if isinstance(stage, tuple) and len(stage) == 2 and isinstance(stage[0], str) and callable(stage[1]):
            named.append((stage[0], stage[1]))
        elif callable(stage):
            named.append((getattr(stage, "__name__", f"stage{i}"), stage))
        else:
            raise TypeError(f"pipeline: stage {i} is {type(stage).__name__}; give callables or (name, callable) pairs")
    return named


def _edge_groups(stage_count: int, world: int) -> dict[tuple[str, int, int], Any]:
    """Two-rank groups, created in the same order on every rank (new_group is collective)."""
    replicas = list(range(stage_count - 1, world))
    edges = [(s, s + 1) for s in range(stage_count - 2)] + [(stage_count - 2, r) for r in replicas]
    groups = {}
    for a, b in edges:
        groups[("data", a, b)] = dist.new_group([a, b])
        groups[("credit", a, b)] = dist.new_group([a, b])
    for r in replicas:
        groups[("result", r, 0)] = dist.new_group([0, r]) if r != 0 else None
    return groups


def pipeline(stages: Sequence[Callable[[Any], Any] | tuple[str, Callable[[Any], Any]]], items: Sequence[Any],
             queue_depth: int = 4, transfer: str = "sendrecv", reuse_memory: bool = True) -> PipelineResult:
    """Runs ``items`` through ``stages``, one stage per rank, the last one replicated.

    Stage ``s < S-1`` runs on rank ``s``; the last stage runs on ranks ``S-1`` to
    ``world_size-1`` (its replicas), fed round-robin. Rank 0 reads ``items``
    (only its list is used) and calls the first stage on each; every stage
    returns a tensor, which moves to the next rank over the process group's
    send/recv. Queues are bounded: a stage sends at most ``queue_depth`` items
    ahead of what the next rank has taken (credits flow back), so a slow stage
    holds the ones before it back instead of letting memory grow. Every rank
    calls ``pipeline`` with the same stages.

    Args:
        stages: callables (or ``(name, callable)`` pairs), at least two. The
            first takes an item of ``items``; the others take the tensor the one
            before returned. Each returns a tensor (up to 11 dims).
        items: the inputs, e.g. image file names (rank 0's are used).
        queue_depth: items a stage may send ahead (credits per edge), >= 1.
        transfer: how an item moves between two ranks: ``"sendrecv"`` (default)
            ``isend``/``recv``, which the backend runs over TCP even on one host, or
            ``"broadcast"``: a broadcast rooted at the sender in the edge's two-rank group,
            which the backend runs through shared memory between ranks of one host (TCP
            between hosts); Note [pipeline transfers].
        reuse_memory: each stage call runs in a step-memory scope (as
            :class:`GradientAverager`'s backward does): its blocks of 1 MiB or more are
            taken from those the previous item freed, so a stage's large temporaries are
            not page-faulted in again for every item (Note [pipeline transfers]); at most
            ``PIPELINE_CACHE_BYTES`` are kept free, and released when the pipeline ends.

    Returns:
        A :class:`PipelineResult`: on rank 0 the last stage's outputs in the
        order of ``items``; on every rank the statistics of every rank.

    Raises:
        ValueError: fewer ranks than stages, fewer than two stages, or a bad ``queue_depth``.
        PipelineError: a stage raised (on every rank, with that stage's error).

    Example:
        >>> stages = [("read", read_image), ("resize", resize), ("normalise", normalise), ("predict", predict)]
        >>> result = pipeline(stages, files if rank == 0 else [], queue_depth=4)
        >>> if rank == 0: print(result.report())
    """
    named = _stage_names(stages)
    world, rank = _group_size_rank(None)
    if len(named) < 2:
        raise ValueError(f"pipeline: give at least two stages, got {len(named)}")
    if world < len(named):
        raise ValueError(f"pipeline: {len(named)} stages need at least {len(named)} ranks (one per stage, the "
                         f"last replicated over the rest), the job has {world}")
    if not isinstance(queue_depth, int) or queue_depth < 1:
        raise ValueError(f"pipeline: queue_depth must be a whole number >= 1, got {queue_depth!r}")
    if transfer not in _TRANSFERS:
        raise ValueError(f"pipeline: transfer must be one of {', '.join(_TRANSFERS)}, got {transfer!r}")
    # The ranks must agree on what shapes the channels (stage count: the groups and edges;
    # queue_depth: the credits; transfer: broadcast or recv), or they wait on each other forever.
    setup = (len(named), queue_depth, transfer)
    setups: list[Any] = [None] * world
    dist.all_gather_object(setups, setup)
    if any(s != setup for s in setups):
        described = "; ".join(f"rank {r}: {s[0]} stages, queue_depth={s[1]}, transfer={s[2]!r}"
                              for r, s in enumerate(setups))
        raise ValueError(f"pipeline: every rank must call it with the same number of stages, queue_depth and "
                         f"transfer; got {described}")
    stage_count = len(named)
    groups = _edge_groups(stage_count, world)
    stage = min(rank, stage_count - 1)
    replicas = list(range(stage_count - 1, world))
    stats = StageStats(rank=rank, stage=stage, name=named[stage][0])
    outputs: dict[int, torch.Tensor] = {}
    started = time.perf_counter()
    try:
        if reuse_memory:
            _C.step_memory_limits(PIPELINE_CACHE_BYTES, GradientAverager.REUSE_MIN_BYTES)
            reuse_memory = _C.step_memory_install()
        error = _run_rank(named, items, queue_depth, groups, rank, stage, replicas, _Rank(), stats, outputs,
                          transfer, reuse_memory)
    finally:
        for g in groups.values():
            if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(g)
        if reuse_memory:
            _C.step_memory_release()
    seconds = time.perf_counter() - started
    if stats.items:
        stats.items_per_second = stats.items / max(stats.busy_seconds, 1e-9)
    # Every rank learns every rank's outcome: a rank that had already ended normally when a
    # later stage raised still raises the same error.
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (error, dataclasses.asdict(stats)))
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise PipelineError(errors[0])
    if rank == 0 and len(outputs) != len(items):
        raise PipelineError(f"pipeline: results for items {sorted(set(range(len(items))) - set(outputs))[:10]} "
                            "are missing")
    result_outputs = [outputs[i] for i in range(len(items))] if rank == 0 else None
    return PipelineResult(result_outputs, [StageStats(**s) for _, s in gathered], seconds)


def _run_rank(named, items, depth, groups, rank, stage, replicas, state: _Rank, stats: StageStats,
              outputs: dict[int, torch.Tensor], transfer: str, reuse_memory: bool) -> str | None:
    """This rank's part; returns the pipeline's error text, or None when it completed."""
    stage_count = len(named)
    name, fn = named[stage]
    last = stage == stage_count - 1
    upstream = stage_count - 2 if last else stage - 1
    inbound = None if stage == 0 else (upstream, rank)
    outbound = [] if last else ([(rank, r) for r in replicas] if stage == stage_count - 2 else [(rank, rank + 1)])
    make = functools.partial(_Channel, transfer=transfer)
    data_in = make(groups[("data", upstream, rank)], upstream) if inbound else None
    credit_up = make(groups[("credit", upstream, rank)], upstream) if inbound else None
    data_out = [make(groups[("data", a, b)], b) for a, b in outbound]
    credit_in = [make(groups[("credit", a, b)], b) for a, b in outbound]
    result_out = make(groups[("result", rank, 0)], 0) if last and rank != 0 else None
    results_in = [make(groups[("result", r, 0)], r) for r in replicas] if rank == 0 else []
    for ch in credit_in:
        state.credits[ch.peer] = threading.Semaphore(depth)
        state.start(functools.partial(state.receive_credits, ch))
    if data_in is not None:
        state.start(functools.partial(state.receive_items, data_in))
    for ch in results_in:
        state.start(functools.partial(state.collect_results, ch, outputs))

    first_start = [0.0]

    def run(index: int, value: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        if stats.items == 0:
            first_start[0] = t0
        if reuse_memory:
            _C.step_memory_enter()
        try:
            out = fn(value)
        except Exception as e:  # noqa: BLE001 - a stage's error stops the pipeline everywhere
            raise _Stop(f"pipeline stage {stage} ({name!r}) on rank {rank} raised on item {index}: "
                        f"{type(e).__name__}: {e}") from None
        finally:
            if reuse_memory:
                _C.step_memory_exit()
        t1 = time.perf_counter()
        stats.busy_seconds += t1 - t0
        stats.wall_seconds = t1 - first_start[0]
        stats.items += 1
        if not isinstance(out, torch.Tensor):
            raise _Stop(f"pipeline stage {stage} ({name!r}) on rank {rank} returned {type(out).__name__} for item "
                        f"{index}; stages return tensors")
        return out

    occupancy_total = 0
    owed, credit_batch = 0, max(1, depth // 2)
    try:
        if stage == 0:
            for index, item in enumerate(items):
                state.check()
                out = run(index, item)
                channel = data_out[index % len(data_out)]
                state.take_credit(channel.peer, stats)
                channel.send_message(_ITEM, index, out)
        else:
            assert data_in is not None and credit_up is not None
            while True:
                t0 = time.perf_counter()
                entry = state.inbox.get()
                stats.starved_seconds += time.perf_counter() - t0
                state.check()
                if entry is None:  # upstream ended
                    break
                with state.lock:
                    waiting = state.queued  # received, not yet processed, this one included
                    state.queued -= 1
                occupancy_total += waiting
                stats.queue_max = max(stats.queue_max, waiting)
                owed += 1
                if owed == credit_batch:  # credits go back in batches: fewer messages, same bound
                    credit_up.send_credit(owed)
                    owed = 0
                index, value = entry
                out = run(index, value)
                if result_out is not None:
                    result_out.send_message(_ITEM, index, out)
                elif last:  # rank 0 is never a replica (stages >= 2), kept for completeness
                    outputs[index] = out
                else:
                    channel = data_out[index % len(data_out)]
                    state.take_credit(channel.peer, stats)
                    channel.send_message(_ITEM, index, out)
        # Normal end: each channel this rank writes gets its terminal message.
        for ch in data_out:
            ch.send_message(_END)
        if result_out is not None:
            result_out.send_message(_END)
        if credit_up is not None:
            credit_up.send_credit(0)
    except _Stop as stop:
        state.fail(str(stop))
    except Exception as e:  # noqa: BLE001 - a failed send (a peer gone): stop here too, never hang
        state.fail(f"pipeline: rank {rank} failed: {type(e).__name__}: {e}")
    if state.error is not None:  # wake the neighbours: every channel not yet ended ends with the error
        for ch in data_out + ([result_out] if result_out is not None else []):
            if not ch.closed:
                _quietly(ch.send_message, _ERROR, text=state.error)
        if credit_up is not None and not credit_up.closed:
            _quietly(credit_up.send_credit, -1, state.error)
    for t in state.threads:  # each ends at its channel's terminal message, which every peer sends
        t.join()
    stats.queue_mean = occupancy_total / stats.items if stats.items and stage > 0 else 0.0
    return state.error
