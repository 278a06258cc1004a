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
