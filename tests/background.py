"""Processes that tests start early and read later: a ``Job`` runs its steps (processes, one after
another) in a daemon thread, while the tests in this process go on on the other core, and the test
that needs the outcome waits for it (``result``).

The advisor's tests use two: tests/fresh_install.py (a fresh venv's install) and the import checks
of test_advisor_wheel.py. Each is started only when a test reading it is to run, and never while
a timed test measures this machine's speed: such a test calls ``wait_all`` first (every job started
so far has ended then; a job started later is not waited for).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

_STARTED: list["Job"] = []


class StepFailed(AssertionError):
    pass


class Job:
    """``body(step)`` in a daemon thread: ``step(name, argv, ...)`` runs one process and returns its
    CompletedProcess (raising StepFailed when it fails, unless ``check=False``); what ``body``
    returns, or raises, is the job's outcome (``result``). ``stop`` kills a step still running."""

    def __init__(self, name: str, body: Callable[[Callable[..., subprocess.CompletedProcess]], object]):
        self.name = name
        self.timings: dict[str, float] = {}
        self._body = body
        self._outcome: object = None
        self._failed: BaseException | None = None
        self._running: list[subprocess.Popen] = []
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        _STARTED.append(self)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._outcome = self._body(self.step)
        except BaseException as e:  # handed to the test that reads the result
            self._failed = e

    def step(self, name: str, argv: list[str], timeout: float, cwd: Path, env: dict,
             check: bool = True) -> subprocess.CompletedProcess:
        start = time.monotonic()
        with self._lock:
            if self._stopped:
                raise StepFailed(f"{name}: not started (the session ended)")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
            self._running.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise StepFailed(f"{name} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
        finally:
            with self._lock:
                self._running.remove(proc)
        self.timings[name] = round(time.monotonic() - start, 1)
        if check and proc.returncode != 0:
            raise StepFailed(f"{name} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s for the job to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float):
        """What ``body`` returned (waiting up to ``timeout`` s for it); raises what it raised."""
        if not self.wait(timeout):
            raise StepFailed(f"{self.name} is not done after {timeout} s (steps done: {self.timings})")
        if self._failed is not None:
            raise self._failed
        return self._outcome

    def stop(self) -> None:
        """Ends a job still running (a session that did not wait for it): its processes are killed."""
        with self._lock:
            self._stopped = True
            for proc in self._running:
                proc.kill()
        self._thread.join(60)


def wait_all(timeout: float = 1500) -> None:
    """Waits until every job started so far has ended (a timed test's machine is then its own)."""
    deadline = time.monotonic() + timeout
    for job in list(_STARTED):
        job.wait(max(deadline - time.monotonic(), 0.0))


def start_if_read(request, fixture: str) -> None:
    """Sets up ``fixture`` now (it starts background work: a Job, a process) when a test to run in this
    session uses it."""
    if any(fixture in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue(fixture)
