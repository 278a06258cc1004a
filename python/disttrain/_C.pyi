"""Type stub for the compiled core, disttrain._C (csrc/bindings)."""

from datetime import timedelta
from typing import Any

import torch.distributed

build_info: dict[str, Any]

class ProcessGroupDisttrain(torch.distributed.Backend):
    """The ``disttrain`` c10d backend (csrc/comm/backend.h)."""

    def __init__(self, store: torch.distributed.Store, rank: int, size: int, timeout: timedelta) -> None: ...
    @property
    def address(self) -> str:
        """``host:port`` this rank listens on."""
    @property
    def transport(self) -> str:
        """``"shm"``, ``"shm+tcp"`` or ``"tcp"``."""
    @property
    def rejected_connections(self) -> int:
        """Connections dropped since set-up (no or wrong job secret)."""

def reduce_kernel_isa() -> str:
    """Instruction set the reduction kernels dispatch to on this CPU."""
