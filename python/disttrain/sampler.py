"""``disttrain.DistributedSampler``: a drop-in for PyTorch's distributed sampler
with an O(1)-memory stream mode and mid-epoch resume, also across world sizes.

The index engine is C++ (``csrc/data/sampler_engine.cpp``); this module checks
arguments, keeps the epoch and resume state and hands indices to Python in
chunks, so iteration runs at list-iterator speed.
"""

from __future__ import annotations

import itertools
import operator
import warnings
from typing import Any, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import _C

__all__ = ["DistributedSampler", "ResumableLoader"]

MODES = ("torch", "stream")
STATE_VERSION = 1
# Indices per C++ call: big enough to hide the call, small enough that the
# chunk's Python ints stay well under a megabyte.
_CHUNK_SIZE = 16384
_SEED_LIMIT = 2**64
_EPOCH_LIMIT = 2**63  # the engine's int64


def _check_epoch(name: str, value: Any) -> int:
    value = _check_int(name, value)
    if not -_EPOCH_LIMIT <= value < _EPOCH_LIMIT:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63)), got {value}")
    return value


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    return value


class _Pass:
    """One rank's pass over an epoch: the C++ stream plus enough bookkeeping to
    tell how many indices were handed out, without a per-index counter."""

    def __init__(self, start: int, stream: Any):
        self.start = start
        self.size = stream.size
        self._stream = stream
        self._handed_before_chunk = 0
        self._chunk_len = 0
        self._chunk: Iterator[int] = iter(())
        self.loader_count: _LoaderCount | None = None

    def _chunks(self) -> Iterator[Iterator[int]]:
        buffer = torch.empty(min(_CHUNK_SIZE, self.size), dtype=torch.long)
        while self._stream.remaining:
            count = self._stream.fill(buffer)
            indices = (buffer if count == len(buffer) else buffer[:count]).tolist()
            self._handed_before_chunk += self._chunk_len
            self._chunk_len = len(indices)
            self._chunk = iter(indices)
            yield self._chunk

    def iterator(self) -> Iterator[int]:
        # chain() pulls from the list iterators in C; the list iterator's
        # length hint tells how far the consumer got.
        return itertools.chain.from_iterable(self._chunks())

    def handed_out(self) -> int:
        return self._handed_before_chunk + self._chunk_len - operator.length_hint(self._chunk)


class _LoaderCount:
    """Samples a :class:`ResumableLoader` has handed to its consumer in the current pass."""

    def __init__(self) -> None:
        self.samples = 0
        self.finished = False


class DistributedSampler(Sampler[int]):
    r"""Splits a data set among the ranks of a job, like
    :class:`torch.utils.data.distributed.DistributedSampler`, with two orders
    to choose from and a resumable state.

    Rank ``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` of the
    epoch's global order; without ``drop_last`` the order is padded with its
    own start so that every rank gets ``ceil(N / R)`` indices, with it the tail
    is cut so every rank gets ``N // R``.

    Args:
        dataset: a sized data set (``len(dataset)`` is the number of samples).
        num_replicas: number of ranks; default: the default process group's size.
        rank: this process's rank in ``[0, num_replicas)``; default: its rank
            in the default process group.
        shuffle: shuffle the order each epoch (else ``0 .. N-1``).
        seed: non-negative seed, the same on every rank.
        drop_last: cut the tail instead of padding.
        mode: ``"torch"`` gives PyTorch's order index for index (a permutation
            from ``torch.randperm`` seeded with ``seed + epoch``, 8 bytes per
            sample in every rank); ``"stream"`` computes each index on the fly
            from a keyed bijection of ``[0, N)`` (a Feistel network), so it
            needs O(1) memory for any ``N``; its order differs from PyTorch's.

    Example::

        >>> sampler = disttrain.DistributedSampler(dataset, mode="stream")
        >>> loader = disttrain.ResumableLoader(DataLoader(dataset, batch_size=64, sampler=sampler))
        >>> for epoch in range(start_epoch, n_epochs):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader:
        ...         train_step(batch)
        ...         if time_to_save():
        ...             save({"sampler": loader.state_dict(), ...})
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        mode: str = "torch",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"DistributedSampler mode must be one of {MODES}, got {mode!r}")
        try:
            dataset_size = len(dataset)
        except TypeError:
            raise TypeError(
                f"DistributedSampler needs a sized data set (one with __len__), got {type(dataset).__name__}; "
                "an IterableDataset must split its stream among ranks itself") from None
        if num_replicas is None or rank is None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("DistributedSampler: pass num_replicas and rank, or initialise the default "
                                   "process group first (disttrain.init())")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        num_replicas = _check_int("num_replicas", num_replicas)
        rank = _check_int("rank", rank)
        seed = _check_int("seed", seed)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if rank < 0 or rank >= num_replicas:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")
        if seed < 0 or seed >= _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.dataset = dataset
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.mode = mode
        self.num_samples = _C.sampler_samples_per_rank(dataset_size, num_replicas, self.drop_last, 0)
        self.total_size = self.num_samples * num_replicas
        self._pass: _Pass | None = None
        self._loader_count: _LoaderCount | None = None
        self._last_epoch: int | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, consumed) from load_state_dict

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        elif self.shuffle and self._last_epoch == self.epoch:
            warnings.warn(
                f"DistributedSampler: starting another pass over epoch {self.epoch}, in the same order as the last "
                "one; call sampler.set_epoch(epoch) before each epoch, or every epoch repeats this order",
                UserWarning, stacklevel=2)
        self._resume = None
        self._last_epoch = self.epoch
        stream = _C.SamplerIndexStream(self.dataset_size, self.num_replicas, self.rank, self.shuffle,
                                       self.seed, self.drop_last, self.mode, self.epoch, start)
        self._pass = _Pass(start, stream)
        # A ResumableLoader announces itself before its DataLoader asks for this pass.
        self._pass.loader_count, self._loader_count = self._loader_count, None
        return self._pass.iterator()

    def __len__(self) -> int:
        """Indices the next pass yields: ``num_samples``, or what is left of the
        epoch right after :meth:`load_state_dict`."""
        if self._resume is not None and self._resume[0] == self.epoch:
            return _C.sampler_samples_per_rank(self.dataset_size, self.num_replicas, self.drop_last,
                                               self._resume[1])
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch, which (with ``seed``) picks the order when ``shuffle=True``.

        Args:
            epoch: epoch number. Setting another epoch than the one a loaded
                state dict was saved in discards that state's resume point.
        """
        self.epoch = _check_epoch("epoch", epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None

    def _consumed(self) -> int:
        """Positions of the epoch's global order the whole job has consumed,
        assuming every rank consumed as many samples as this one."""
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume[1]
        if self._pass is None or self._last_epoch != self.epoch:
            return 0
        count = self._pass.loader_count
        if count is not None:
            taken = self._pass.size if count.finished else min(count.samples, self._pass.size)
        else:
            taken = self._pass.handed_out()
        if taken >= self._pass.size:
            # A finished pass finishes the epoch, including what drop_last cut.
            return self.dataset_size
        return self._pass.start + taken * self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position in the current epoch.

        ``consumed`` counts positions of the epoch's global order taken by the
        whole job: the pass's start plus this rank's count times
        ``num_replicas``. That holds when all ranks consume in lockstep (the
        same number of samples each, as in data-parallel training), so any one
        rank's state, typically rank 0's, describes the job. A rank counts what
        its consumer took: what a :class:`ResumableLoader` handed out, or, when
        the sampler is iterated directly, what the iterator yielded. A finished
        pass records ``consumed == dataset_size``.

        Returns:
            A dict of plain Python values (safe for ``torch.save`` and JSON).
        """
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "epoch": self.epoch,
            "consumed": self._consumed(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from :meth:`state_dict`, possibly saved with another world size.

        The next pass over the saved epoch yields this rank's share of the
        positions the job had not consumed: rank ``r`` of the current ``R``
        takes ``consumed + r``, ``consumed + r + R``, ...; so across the old and
        new ranks each sample of the epoch is taken once (plus the padding of
        the last pass without ``drop_last``, which repeats the epoch's first
        samples; with ``drop_last`` the tail the new split cannot fill evenly
        is cut).

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            ValueError: the state is for another data set size, mode, seed,
                shuffle or drop_last setting, or is malformed.
        """
        required = ("version", "mode", "dataset_size", "shuffle", "seed", "drop_last", "epoch", "consumed")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"not a DistributedSampler state dict: missing {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"unsupported DistributedSampler state version {state['version']} "
                             f"(this version reads {STATE_VERSION})")
        if state["dataset_size"] != self.dataset_size:
            raise ValueError(f"the state dict is for a data set of {state['dataset_size']} samples, but this "
                             f"sampler's data set has {self.dataset_size}; resuming would skip or repeat samples")
        for key in ("mode", "shuffle", "seed", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the state dict was saved with {key}={state[key]!r}, but this sampler has "
                                 f"{key}={getattr(self, key)!r}; the epoch's order would differ")
        epoch = _check_epoch("state epoch", state["epoch"])
        consumed = _check_int("state consumed", state["consumed"])
        if not 0 <= consumed <= self.dataset_size:
            raise ValueError(f"state consumed={consumed} is outside [0, {self.dataset_size}]")
        self.epoch = epoch
        self._resume = (epoch, consumed)
        self._last_epoch = None


def _find_sampler(loader: Any) -> DistributedSampler:
    for candidate in (getattr(loader, "sampler", None),
                      getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(candidate, DistributedSampler):
            return candidate
    raise TypeError("ResumableLoader needs a DataLoader whose sampler (or batch_sampler.sampler) is a "
                    f"disttrain.DistributedSampler; got sampler {type(getattr(loader, 'sampler', None)).__name__}")


class ResumableLoader:
    r"""Wraps a :class:`torch.utils.data.DataLoader` over a
    :class:`DistributedSampler` so the sampler's state counts the batches the
    training loop received, not the ones the loader's workers prefetched.

    A batch counts as consumed once the loop receives it; save after training
    on it. Iteration, ``len`` and everything else behave as the loader's.

    Args:
        loader: the DataLoader; its sampler or batch sampler's sampler must be
            a :class:`DistributedSampler`.
        samples_per_batch: samples in a full batch; default ``loader.batch_size``
            (1 without automatic batching). Required for a custom batch sampler.

    Example::

        >>> loader = ResumableLoader(DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2))
        >>> loader.load_state_dict(checkpoint["sampler"])   # resumes mid-epoch
        >>> for batch in loader: ...
    """

    def __init__(self, loader: Any, samples_per_batch: int | None = None) -> None:
        self.loader = loader
        self.sampler = _find_sampler(loader)
        if samples_per_batch is None:
            if getattr(loader, "batch_size", None) is not None:
                samples_per_batch = loader.batch_size
            elif getattr(loader, "batch_sampler", None) is None:
                samples_per_batch = 1
            else:
                raise ValueError("ResumableLoader cannot tell the batch size of a custom batch_sampler; "
                                 "pass samples_per_batch")
        samples_per_batch = _check_int("samples_per_batch", samples_per_batch)
        if samples_per_batch < 1:
            raise ValueError(f"samples_per_batch must be >= 1, got {samples_per_batch}")
        self.samples_per_batch = samples_per_batch

    def __iter__(self) -> Iterator[Any]:
        count = _LoaderCount()
        self.sampler._loader_count = count
        for batch in self.loader:
            count.samples += self.samples_per_batch
            yield batch
        count.finished = True

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's :meth:`DistributedSampler.state_dict`, counted in consumed batches."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a sampler state; see :meth:`DistributedSampler.load_state_dict`."""
        self.sampler.load_state_dict(state)
