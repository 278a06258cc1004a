"""The chaos soak's short version (issue 19; scripts/soak.sh runs the long one):
one trainer run with one fault drawn from tests/chaos_soak.py's FAULTS (kill -9
of a random rank at a random instant, mid-snapshot, mid-collective, SIGSTOP
past the timeout, a full disk, a corrupted newest snapshot), next to the
uninterrupted run, which runs at the same time. It must end bit-identical to
it, or fail with a clear error and then resume to it; never hang. The fault is
drawn from DISTTRAIN_SOAK_SEED (new each session unless set; in the test id
and every failure message)."""

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import chaos_soak

_SEED_TEXT = os.environ.get("DISTTRAIN_SOAK_SEED") or str(random.randrange(10**6))
if not _SEED_TEXT.isdigit():
    raise ValueError(f"DISTTRAIN_SOAK_SEED={_SEED_TEXT!r}: expected a whole number")
_SEED = int(_SEED_TEXT)
_RNG = random.Random(_SEED)
_FAULT = _RNG.choice(chaos_soak.FAULTS)


@pytest.mark.parametrize("fault", [_FAULT], ids=[f"{_FAULT}-seed{_SEED}"])
def test_faulty_run_ends_like_the_uninterrupted_run(tmp_path, fault):
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(chaos_soak.reference_run, str(tmp_path))
        outcome = chaos_soak.run_one(fault, _RNG, chaos_soak.Timing(), str(tmp_path), 0)
        reference_state, _ = reference.result()
    chaos_soak.judge(outcome, reference_state)
    replay = f"replay with DISTTRAIN_SOAK_SEED={_SEED} python3 -m pytest tests/test_chaos_soak.py"
    assert not outcome.hung, f"{fault} ({outcome.detail}) hung; {replay}\n" + "\n".join(outcome.problems)
    assert outcome.ok, f"{fault} ({outcome.detail}); {replay}:\n" + "\n".join(outcome.problems)
