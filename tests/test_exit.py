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

The runs are made ahead of the tests (the module's `outcomes`), each case's in
sequence, and each test judges its own case's runs. The cases without a pending
op (no timing bound) run in two lanes at once: the one-host cases in one, the
two-host cases in the other (their own network namespaces: no address or port
shared); alone, a job leaves a core idle for a good part of its time (while its
launcher imports torch). The pending cases, whose rank 0 must exit within a
bound, then run one at a time, alone.
"""

from __future__ import annotations

import os
import threading

import pytest

import disttrain.distributed
from exit_matrix import Case, can_make_hosts, make_hosts, remove_hosts, run_case
from harness import shared_memory_segments

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


LIMIT = 60.0  # the group timeout is 60 s: an exit that waits for it is a hang here


@pytest.fixture(scope="module")
def outcomes(request, hosts):
    """The runs of every case selected in this module, made before its first test: the
    cases without a pending op in two lanes (threads) at once, one-host and two-host; then
    the pending cases one after the other, nothing else running.
    -> ({case label: [Outcome per run] or the exception its runs raised}, shared-memory
    segments the runs left behind: they are made before any test's own leftover check
    (conftest) looks, so that check is made here, over all the runs)."""
    selected = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is request.module and "case" in params:
            if params["case"].topology == "one-host" or hosts is None:  # else the test fails, saying why
                selected.append((params["case"], params["runs"]))
    results: dict[str, list | BaseException] = {}

    def lane(cases):
        for case, runs in cases:
            try:
                results[case.label()] = [run_case(case, limit=LIMIT) for _ in range(runs * REPEATS)]
            except BaseException as e:  # noqa: BLE001 - the case's test raises it
                results[case.label()] = e

    before = shared_memory_segments()
    lanes = [[(c, r) for c, r in selected if not c.pending and c.topology == topology]
             for topology in ("one-host", "two-hosts")]
    threads = [threading.Thread(target=lane, args=(cases,), daemon=True) for cases in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lane([(c, r) for c, r in selected if c.pending])
    return results, sorted(shared_memory_segments() - before)


@pytest.mark.parametrize("case,runs", _cases())
def test_exit(hosts, outcomes, case, runs):
    if case.topology == "two-hosts" and hosts is not None:
        pytest.fail(f"two-host exit tests {hosts}")
    results, leftover = outcomes
    runs_made = results[case.label()]
    if isinstance(runs_made, BaseException):
        raise runs_made
    assert len(runs_made) == runs * REPEATS
    for i, o in enumerate(runs_made):
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
    assert not leftover, f"the exit matrix's runs left shared-memory segments behind: {leftover}"
