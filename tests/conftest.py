import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


import glob

import pytest


@pytest.fixture(autouse=True)
def no_leftover_shared_memory():
    """No test may leave a disttrain segment behind in /dev/shm, crash or not."""
    before = set(glob.glob("/dev/shm/disttrain-*"))
    yield
    leftover = set(glob.glob("/dev/shm/disttrain-*")) - before
    assert not leftover, f"shared-memory segments left behind: {sorted(leftover)}"


@pytest.fixture(autouse=True, scope="session")
def advisor_fit_cache(tmp_path_factory):
    """The advisor's fit cache (disttrain.advisor.cache) in a folder of this session: the
    default logs are fitted once per session, then read by the tests, their subprocesses and
    the notebooks; never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DISTTRAIN_ADVISOR_CACHE", str(tmp_path_factory.mktemp("advisor-cache")))
    yield
    patch.undo()
