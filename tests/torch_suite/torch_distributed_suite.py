"""PyTorch's own distributed test suite (torch.testing._internal.distributed.
distributed_test, shipped in the wheel) run against a third-party backend, as
torch's test/distributed/test_distributed_spawn.py runs it against gloo.

    BACKEND=disttrain WORLD_SIZE=2 python -m pytest tests/torch_suite/torch_distributed_suite.py
    BACKEND=gloo WORLD_SIZE=2 python -m pytest tests/torch_suite/torch_distributed_suite.py

For disttrain the backend joins the suite's "ddp", "subgroup" and "plugin"
feature sets (what it implements), in this runner, before the suite is
imported; torch itself is not patched. scripts/torch_suite.sh runs the whole
suite for both backends at 2 and 3 ranks and compares."""

import os
import tempfile

os.environ.setdefault("BACKEND", "disttrain")
os.environ.setdefault("WORLD_SIZE", "2")
if "TEMP_DIR" not in os.environ:
    os.environ["TEMP_DIR"] = tempfile.mkdtemp(prefix="disttrain-torch-suite-")

import torch  # noqa: E402
from torch.testing._internal.common_distributed import DistTestCases  # noqa: E402

if os.environ["BACKEND"] == "disttrain":
    import disttrain  # noqa: F401,E402  (registers the backend, in this process and in every spawned rank)

    for feature in ("ddp", "subgroup", "plugin"):
        DistTestCases.backend_feature[feature].add("disttrain")

from torch.testing._internal.common_utils import run_tests  # noqa: E402
from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend  # noqa: E402


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    run_tests()
