"""``"disttrain_decentralised"``: each Lightning process is one peer of
disttrain's decentralised training (DiLoCo rounds; see
``disttrain.strategies.decentralised`` and docs/decentralised.md), as the
hivemind strategy is for Lightning: one device per process, no process group,
peers that find each other from ``initial_peers``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from ..strategies.decentralised import DecentralisedConfig, Peer
from ._checkpoint_io import SnapshotCheckpointIO


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, Sequence) and batch:
        return _batch_size(batch[0])
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}")


class DisttrainDecentralisedStrategy(SingleDeviceStrategy):
    """One peer per Lightning process, on the CPU. After each optimizer step
    the peer counts a local step; every ``local_steps`` steps it averages the
    parameter deltas with the peers that are ready and applies the outer
    Nesterov step. A joining peer downloads the current state first.

    Args:
        initial_peers: ``"host:port,..."`` of live peers (default: the
            ``DISTTRAIN_INITIAL_PEERS`` environment variable; none: the first peer).
        listen: this peer's ``host:port`` (default ``DISTTRAIN_LISTEN`` or
            ``127.0.0.1:0``, any free port).
        secret: the job secret (default ``DISTTRAIN_PEER_SECRET``).
        local_steps, outer_lr, outer_momentum, min_group_size,
        matchmaking_window, compression, round_timeout: as in
            :class:`~disttrain.strategies.decentralised.DecentralisedConfig`.
        wait_for_peers: start training only once this many other peers are seen
            (at most 60 s, or ``round_timeout`` if longer).
    """

    strategy_name = "disttrain_decentralised"

    def __init__(self, initial_peers: str | None = None, listen: str | None = None, secret: str | None = None, *,
                 local_steps: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9, min_group_size: int = 2,
                 matchmaking_window: float = 2.0, compression: str | None = None, round_timeout: float = 30.0,
                 wait_for_peers: int = 0, accelerator: Any = None, checkpoint_io: Any = None,
                 precision_plugin: Any = None):
        super().__init__(device=torch.device("cpu"), accelerator=accelerator,
                         checkpoint_io=checkpoint_io or SnapshotCheckpointIO(), precision_plugin=precision_plugin)
        self.config = DecentralisedConfig(local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                                          min_group_size=min_group_size, matchmaking_window=matchmaking_window,
                                          compression=compression, round_timeout=round_timeout)
        self.config.validate()
        self.initial_peers = initial_peers if initial_peers is not None else os.environ.get("DISTTRAIN_INITIAL_PEERS")
        self.listen = listen or os.environ.get("DISTTRAIN_LISTEN", "127.0.0.1:0")
        self.secret = secret
        if wait_for_peers < 0:
            raise ValueError(f"wait_for_peers must be >= 0, got {wait_for_peers}")
        self.wait_for_peers = wait_for_peers
        self.peer: Peer | None = None
        self._samples = 0

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict: no training, so no peer (and nobody to wait for)
        if len(self.optimizers) != 1:
            raise ValueError(f"disttrain_decentralised averages one optimizer's parameters; the LightningModule "
                             f"configured {len(self.optimizers)}")
        module = self.lightning_module
        assert module is not None  # set by super().setup()
        host, _, port = self.listen.rpartition(":")
        self.peer = Peer(module, self.optimizers[0], initial_peers=self.initial_peers, host=host,
                         port=int(port), secret=self.secret, config=self.config)
        self.peer.start()
        if self.wait_for_peers:
            self.peer.wait_for_peers(self.wait_for_peers, timeout=max(60.0, self.config.round_timeout))

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._samples = _batch_size(args[0]) if args else 0
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        module = self.lightning_module
        if self.peer is not None and module is not None and module.training:
            self.peer.local_step_done(self._samples)
        return out

    def teardown(self) -> None:
        if self.peer is not None:
            s = self.peer.stats
            rank_zero_info(f"disttrain_decentralised: peer {self.peer.address}: {s.rounds} rounds, mean group size "
                           f"{sum(s.group_sizes) / max(len(s.group_sizes), 1):.2f}, {len(s.peers_seen)} peers seen, "
                           f"{s.resyncs} state downloads, {sum(s.bytes_sent) / 1e6:.2f} MB sent")
            self.peer.close()
            self.peer = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="one peer of disttrain's decentralised (DiLoCo) training per process")
