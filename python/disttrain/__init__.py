"""disttrain: distributed training with a C++ core.

``import disttrain`` registers the ``"disttrain"`` torch.distributed backend, so
``torch.distributed.init_process_group("disttrain")`` works under torchrun.
"""

import torch
import torch.distributed  # registers c10d's types with pybind11 before _C binds against them

from . import _C
from .distributed import BackendOptions, init, register_backend
from .ddp import DistributedDataParallel
from .fsdp import FullyShardedDataParallel, ShardedOptimizer
from .launch import LaunchError, launch
from .sampler import DistributedSampler, ResumableLoader
from .trainer import Trainer, TrainerConfig

__version__ = "0.1.0"

register_backend()

__all__ = ["BackendOptions", "DistributedDataParallel", "FullyShardedDataParallel", "ShardedOptimizer", "DistributedSampler", "ResumableLoader", "Trainer", "TrainerConfig", "init", "launch", "LaunchError", "register_backend", "__version__"]
