"""Fault injection under torchrun: a rank is SIGKILLed once (during forward,
with a collective in flight, or while rank 0 writes a snapshot); torchrun
restarts the group, training resumes from the newest good snapshot, and the
final parameters equal those of an uninterrupted run bit for bit."""

import os
import random
import re
import subprocess

import pytest

from chaos_soak import EPOCHS, SNAPSHOT_EVERY, STEPS, differences, train_command, train_env
from disttrain import snapshot


def _train(tmp_path, name, extra_env=None):
    proc = subprocess.run(train_command(str(tmp_path), name), env=train_env(extra_env), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    path, state = snapshot.load_latest(tmp_path / name / "snapshots")
    assert path is not None, output
    return state, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    state, output = _train(tmp_path_factory.mktemp("reference"), "ref")
    assert state["epochs_run"] == EPOCHS and state["global_step"] == STEPS
    assert "resumed from" not in output
    return state


# Random points after the first snapshot (before it, a restart simply starts over). The seed
# is new each session unless DISTTRAIN_FAULT_SEED sets it (conftest.py draws it and prints
# it in the session header); it is in the test ids and in every failure message.
_SEED_TEXT = os.environ.get("DISTTRAIN_FAULT_SEED") or str(random.randrange(1000))
if not _SEED_TEXT.isdigit():
    raise ValueError(f"DISTTRAIN_FAULT_SEED={_SEED_TEXT!r}: expected a whole number")
_SEED = int(_SEED_TEXT)
_REPLAY = f"replay with DISTTRAIN_FAULT_SEED={_SEED} python3 -m pytest tests/test_trainer_faults.py"
_rng = random.Random(_SEED)
_CASES = [("forward", _rng.randrange(2), _rng.randint(SNAPSHOT_EVERY + 1, STEPS - 2)),
          ("collective", _rng.randrange(2), _rng.randint(SNAPSHOT_EVERY + 1, STEPS - 2)),
          ("snapshot", 0, _rng.randint(SNAPSHOT_EVERY + 1, STEPS - 6))]


@pytest.mark.parametrize("where,rank,step", _CASES, ids=[f"{c[0]}-rank{c[1]}-step{c[2]}-seed{_SEED}" for c in _CASES])
def test_killed_rank_resumes_to_identical_parameters(tmp_path, reference, where, rank, step):
    state, output = _train(tmp_path, "faulty", {"DISTTRAIN_FAULT_INJECT": f"{rank}:{step}:{where}"})
    context = f"kill -9 of rank {rank} at step {step} during {where} ({_REPLAY})\n{output}"
    marker = tmp_path / "faulty" / ".fault_injected"
    assert marker.exists(), context
    # Snapshots are written in the background: a kill soon after one was taken can beat its
    # file, and then the restart starts over. The marker lists the files complete at the kill.
    committed = marker.read_text().splitlines()[1].split(":", 1)[1].split()
    if committed or where == "snapshot":
        assert "resumed from" in output, f"snapshots complete at the kill: {committed}\n{context}"
    if committed:  # from the newest good one (or one completed after the kill), never an older one
        resumed_step = int(re.search(r"resumed from \S+ \(epoch \d+, step (\d+)", output).group(1))
        assert resumed_step >= int(re.search(r"(\d+)\.dts$", committed[-1]).group(1)), context
    metrics = (tmp_path / "faulty" / "metrics.csv").read_text().splitlines()
    problems = differences(reference, state, len(metrics) - 1)  # also: no epoch logged twice
    assert not problems, f"{problems} after {context}"
