"""A selection of PyTorch's own distributed test suite against disttrain
(tests/torch_suite/torch_distributed_suite.py; scripts/torch_suite.sh runs all
of it against disttrain and gloo at 2 and 3 ranks). The selection covers what
the whole-suite run once found broken: all_gather_coalesced's calling
convention (outputs[rank][input])."""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SELECTION = ["test_all_gather_coalesced_simple", "test_all_gather_coalesced_with_empty"]


def test_pytorch_distributed_suite_selection(tmp_path):
    env = {**os.environ, "BACKEND": "disttrain", "WORLD_SIZE": "2", "TEMP_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                        os.path.join(HERE, "torch_suite", "torch_distributed_suite.py"), "-k", " or ".join(SELECTION)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for name in SELECTION:  # each ran and passed (not skipped)
        assert re.search(rf"^PASSED \S*::TestDistBackendWithSpawn::{name}$", r.stdout, re.M), r.stdout[-3000:]
