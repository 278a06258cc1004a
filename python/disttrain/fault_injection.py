"""Fault injection for the trainer's fault tests: one chosen rank SIGKILLs
itself once, at a chosen step and place, as a crash would.

``DISTTRAIN_FAULT_INJECT=RANK:STEP:WHERE`` with WHERE one of

- ``forward``: inside the model's forward pass of global step STEP;
- ``collective``: after issuing an all-reduce, while the peers are inside it;
- ``snapshot``: in the middle of writing the first snapshot taken at or after
  STEP (rank 0 writes snapshots, so RANK must be 0).

A marker file (``DISTTRAIN_FAULT_MARKER``, default ``<run folder>/.fault_injected``)
is created before the kill, so the restarted run does not fail again. Its first
line is ``WHERE:STEP``; its second, ``committed:`` and the snapshot files that
were complete in the snapshot folder at that instant (oldest first). Snapshots are
written in the background, so a kill one step after a snapshot was taken can
come before its file is complete; the restart then starts over, and the marker
says which of the two a test must expect.
"""

from __future__ import annotations

import os
import signal

from . import snapshot

_PLACES = ("forward", "collective", "snapshot")


class FaultInjector:
    def __init__(self, rank: int, run_dir: str, snapshot_dir: str):
        self.snapshot_dir = snapshot_dir
        spec = os.environ.get("DISTTRAIN_FAULT_INJECT", "")
        self.marker = os.environ.get("DISTTRAIN_FAULT_MARKER") or os.path.join(run_dir, ".fault_injected")
        self.where = None
        if not spec:
            return
        parts = spec.split(":")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in _PLACES:
            raise ValueError(f"DISTTRAIN_FAULT_INJECT='{spec}': expected RANK:STEP:WHERE, WHERE in {_PLACES}")
        if int(parts[0]) == rank and not os.path.exists(self.marker):
            self.step, self.where = int(parts[1]), parts[2]

    def _armed(self, where: str, step: int, at_or_after: bool = False) -> bool:
        return self.where == where and (step >= self.step if at_or_after else step == self.step)

    def _mark(self) -> None:
        committed = [os.path.basename(p) for p in snapshot.list_snapshots(self.snapshot_dir)]
        with open(self.marker, "w") as f:
            f.write(f"{self.where}:{self.step}\ncommitted: {' '.join(committed)}\n")
            f.flush()
            os.fsync(f.fileno())
        self.where = None

    def _die(self) -> None:
        self._mark()
        os.kill(os.getpid(), signal.SIGKILL)

    def in_forward(self, step: int) -> None:
        if self._armed("forward", step):
            self._die()

    def in_collective(self, step: int, start_collective) -> None:
        """``start_collective()`` issues an async collective; the rank dies with it in flight."""
        if self._armed("collective", step):
            start_collective()
            self._die()

    def before_snapshot(self, step: int) -> None:
        if self._armed("snapshot", step, at_or_after=True):
            self._mark()
            # Past the header page, inside the tensor data: a torn file.
            os.environ["DISTTRAIN_SNAPSHOT_FAULT"] = "kill:6000"
