"""PyTorch's own distributed test suite (torch.testing._internal.distributed.
distributed_test, shipped in the wheel) run against a third-party backend, as
torch's test/distributed/test_distributed_spawn.py runs it against gloo.

    BACKEND=disttrain WORLD_SIZE=2 python -m pytest tests/torch_suite/torch_distributed_suite.py
    BACKEND=gloo WORLD_SIZE=2 python -m pytest tests/torch_suite/torch_distributed_suite.py

For disttrain the backend joins the suite's "ddp", "subgroup" and "plugin"
feature sets (what it implements), in this runner, before the suite is
imported; torch itself is not patched. Some tests the suite runs only for
backends it names (gloo, or gloo/nccl/ucc) although they need nothing but a
CPU backend with the ops disttrain implements: they are run against disttrain
too (RUN_ON_DISTTRAIN_TOO, under their own names, calling the suite's own
test). scripts/torch_suite.sh runs the whole suite for both backends at 2 and
3 ranks and compares."""

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
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed import distributed_test  # noqa: E402
from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend  # noqa: E402


def _in_environment(environ, run, *args, **kwargs):
    os.environ.clear()
    os.environ.update(environ)
    return run(*args, **kwargs)


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _spawn_processes(self):
        """The ranks start from a fork server that has imported this module (torch, the suite,
        disttrain) once, instead of each spawned rank importing them anew: that import was most of
        each test's 6 s (2 Dec 2026: 5 tests at 2 ranks 64 s spawned, 12 s this way). Each rank is
        still a fresh child of a process that ran no test; the environment of the moment (the
        suite's setUp points TEMP_DIR and INIT_METHOD at this test's folders) is handed to it, as
        spawning would."""
        import multiprocessing

        # Python 3.11's fork server ignores the sys.path it is handed, so the preload finds this
        # module through PYTHONPATH (else every rank imports it again: as slow as spawning).
        here = os.path.dirname(os.path.abspath(__file__))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if here not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        environ = dict(os.environ)

        def process(target, name, args=(), kwargs=None):  # called as torch's runner calls a Process class
            return context.Process(target=_in_environment, name=name, args=(environ, target, *args),
                                   kwargs=kwargs or {})

        self._start_processes(process)


# Gated on the backend's name in the suite (skip_but_pass_in_sandcastle_if(BACKEND != "gloo"),
# require_backend_is_available({"gloo"}) or the {"gloo", "nccl", "ucc"} set), CPU tensors only, and
# only ops disttrain implements. The suite's decorators mark the test functions themselves as skipped;
# a method of the same name here calls the function, so its other decorators (world size, GPU
# count, debug levels) still apply. docs/backend.md lists what stays gated and why.
RUN_ON_DISTTRAIN_TOO = [
    *(f"test_all_reduce_coalesced{group}_{op}" for group in ("", "_group", "_full_group")
      for op in ("sum", "product", "min", "max")),
    "test_accumulate_gradients_no_sync",
    "test_accumulate_gradients_no_sync_allreduce_hook",
    "test_accumulate_gradients_no_sync_allreduce_with_then_hook",
    "test_accumulate_gradients_no_sync_grad_is_view",
    "test_get_future",
    "test_grads_same_across_ranks_with_no_sync",
    "test_all_gather_object_default_pg",
    "test_all_gather_object_subgroup",
    "test_scatter_object_list",
    "test_barrier_timeout_group",
    "test_barrier_timeout_full_group",
    "test_batch_isend_irecv_gloo",
    "test_batch_isend_irecv_gloo_tags",
    "test_sparse_all_reduce_sum",
]


# These share one body (_test_accumulate_gradients_no_sync) that builds its model only under
# `if BACKEND == "mpi" or BACKEND == "gloo"` (the CPU path; the other branch is NCCL's) and reads
# BACKEND for nothing else. It runs with the suite module's BACKEND reading "gloo" for the body
# only; the process group is the job's disttrain group throughout, which is checked before and after.
CPU_PATH_NAMED_GLOO = {
    "test_accumulate_gradients_no_sync",
    "test_accumulate_gradients_no_sync_allreduce_hook",
    "test_accumulate_gradients_no_sync_allreduce_with_then_hook",
    "test_accumulate_gradients_no_sync_grad_is_view",
}


def _run_the_suites_test(name):
    suites_test = getattr(DistributedTest._DistTestBase, name)

    def test(self):
        if name not in CPU_PATH_NAMED_GLOO:
            return suites_test(self)
        assert dist.get_backend() == "disttrain", dist.get_backend()
        backend = distributed_test.BACKEND
        distributed_test.BACKEND = "gloo"
        try:
            suites_test(self)
        finally:
            distributed_test.BACKEND = backend
        assert dist.get_backend() == "disttrain", dist.get_backend()

    test.__name__ = test.__qualname__ = name
    test.__doc__ = suites_test.__doc__
    return test


if os.environ["BACKEND"] == "disttrain":
    for _name in RUN_ON_DISTTRAIN_TOO:
        setattr(TestDistBackendWithSpawn, _name, _run_the_suites_test(_name))


if __name__ == "__main__":
    run_tests()
