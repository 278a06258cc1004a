"""The exit matrix: a job whose work is done exits with status 0 on every rank,
whatever the teardown. A disttrain group and a gloo group side by side (either
one the default), on one host (2 ranks) and on two hosts (network namespaces,
2 ranks each), launched by torchrun; the script ends without
destroy_process_group(), with it, or destroying the subgroup first; with or
without an op left pending (it fails with an error naming it, within seconds,
not at the group timeout). Each case runs several times: the aborts this guards
against (a thread of a backend ended by Python mid-destructor while the
interpreter exits) are races. scripts/soak_exit.sh runs the same cases many
times.
"""

from __future__ import annotations

import os

import pytest

import disttrain.distributed
from exit_matrix import Case, can_make_hosts, make_hosts, remove_hosts, run_case

# Runs per case are multiplied by this (DISTTRAIN_EXIT_REPEATS=10 for a long local check).
REPEATS = int(os.environ.get("DISTTRAIN_EXIT_REPEATS", "1"))

# Interpreter exit without destroy_process_group() is safe only if the groups
# are destroyed before Python finalizes (python/disttrain/distributed.py
# registers that at exit, once a disttrain group exists): otherwise gloo's
# worker thread may release its last op's tensors after finalization began,
# and Python ends it inside a destructor (SIGABRT). See docs/backend.md.
def _cases():
    out = []
    for topology in ("one-host", "two-hosts"):
        for default in ("disttrain", "gloo"):
            # The suite's share of the runs (46 took 5 minutes, a quarter of the suite): scripts/soak_exit.sh
            # and DISTTRAIN_EXIT_REPEATS run every case many times.
            for teardown, pending, runs in (("none", False, 2), ("none", True, 1), ("destroy", False, 1),
                                            ("destroy", True, 1), ("sub-first", False, 1)):
                if (topology, default, teardown, pending) == ("two-hosts", "disttrain", "none", False):
                    runs = 3  # the case of the report: mixed groups, two hosts, no destroy_process_group()
                marks: list = []
                case = Case(topology=topology, default=default, teardown=teardown, pending=pending)
                out.append(pytest.param(case, runs, marks=marks, id=case.label().replace(" ", ",")))
    return out


@pytest.fixture(scope="module")
def hosts():
    """Two namespace hosts for the module; the one-host cases run without them."""
    why = can_make_hosts()
    if why is None:
        make_hosts()
    yield why
    if why is None:
        remove_hosts()


@pytest.mark.parametrize("case,runs", _cases())
def test_exit(hosts, case, runs):
    if case.topology == "two-hosts" and hosts is not None:
        pytest.fail(f"two-host exit tests {hosts}")
    limit = 60.0  # the group timeout is 60 s: an exit that waits for it is a hang here
    for i in range(runs * REPEATS):
        o = run_case(case, limit=limit)
        tail = o.log[-3000:]
        assert not o.aborted, f"run {i + 1}: a rank aborted: {o.describe()}\n{tail}"
        assert not o.hung, f"run {i + 1}: hung at exit: {o.describe()}\n{tail}"
        assert o.clean, f"run {i + 1}: {o.describe()}\n{tail}"
        if case.pending and case.teardown != "none":
            rec = o.pending.get(0)
            assert rec is not None, f"run {i + 1}: rank 0 never reported its pending op: {o.describe()}"
            error = rec["error"] or ""
            # Torn down here ("shut down ... while allreduce (sequence number N) was in progress"),
            # or a peer left first ("rank 1 closed its connection while rank 0 was in ...").
            assert "DistBackendError" in error and "disttrain:" in error, error
            assert "shut down" in error or "closed its connection" in error, error
            assert rec["teardown_seconds"] < 2, rec
        if case.pending:
            # The other ranks keep the group 3 s longer: rank 0 must not wait for them.
            assert o.exit_after_teardown.get(0, 99) < 2.5, f"run {i + 1}: the pending op held the exit: {o.describe()}"
