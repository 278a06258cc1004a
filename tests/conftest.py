import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


import random

import pytest

import harness

# tests/test_trainer_faults.py draws its kill points from this seed: a new one
# each session unless set, always shown in the session header, so a failing
# session's cases can be run again exactly.
os.environ.setdefault("DISTTRAIN_FAULT_SEED", str(random.SystemRandom().randrange(1000)))


def _fault_seed_line():
    return f"fault-injection cases: DISTTRAIN_FAULT_SEED={os.environ['DISTTRAIN_FAULT_SEED']} " \
           "(set it to replay this session's cases)"


def pytest_report_header(config):
    return _fault_seed_line()


_fault_cases_collected = False


def pytest_collection_modifyitems(config, items):
    global _fault_cases_collected
    _fault_cases_collected = any("test_trainer_faults" in item.nodeid for item in items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _fault_cases_collected:  # also under -q, which hides the header
        terminalreporter.write_line(_fault_seed_line())


@pytest.fixture(autouse=True)
def no_leftover_shared_memory():
    """No test may leave a disttrain segment behind in /dev/shm, crash or not."""
    with harness.no_leftover_shared_memory():
        yield


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """A test, or the library code it runs in-process, must not hand its environment variables to
    the next test (a failed disttrain.init once left RANK and WORLD_SIZE=2 behind, and later tests
    took themselves for a rank of that job): the environment is put back after each."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True, scope="session")
def advisor_fit_cache(tmp_path_factory):
    """The advisor's fit cache (disttrain.advisor.cache) in a folder of this session: the
    default logs are fitted once per session, then read by the tests, their subprocesses and
    the notebooks; never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DISTTRAIN_ADVISOR_CACHE", str(tmp_path_factory.mktemp("advisor-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def two_rank_cpu_run(tmp_path_factory):
    """A real 2-rank `disttrain train` run on this machine's CPU (harness.train_two_ranks: the
    README's main job), made once for the session: the advisor's tests read its metrics.csv as a
    user's run (--data) and predict it (--predict). Returns the folder of runs
    (``<folder>/two/metrics.csv``)."""
    folder = tmp_path_factory.mktemp("two-rank-run") / "runs"
    harness.train_two_ranks(folder)
    return folder


@pytest.fixture(scope="session")
def fresh_install(tmp_path_factory):
    """tests/fresh_install.py's job (a fresh venv, pip install '<repo>[advisor]', `disttrain advise`
    from outside the repository), started in the background once for the session."""
    import fresh_install as job

    started = job.start(tmp_path_factory.mktemp("fresh-install"), os.path.dirname(HERE))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def advisor_import_checks(tmp_path_factory):
    """test_advisor_wheel.py's import checks (fresh interpreters, one after another), started in
    the background once for the session: test_advisor.py starts them at its start when they are to
    run (advisor_import_checks.start)."""
    import advisor_import_checks as checks

    started = checks.start(tmp_path_factory.mktemp("import-checks"))
    yield started
    started.stop()
