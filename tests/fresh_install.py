"""``pip install '<repo>[advisor]'`` into a new virtual environment, then ``disttrain advise``
from a folder outside the repository, without DISTTRAIN_EPOCH_LOGS (the shipped logs must be found
in the installed package): test_advisor_install.py checks what it returns.

It runs in a thread of its own (``Job``), started by conftest's ``fresh_install`` fixture before the
in-process advisor tests (test_advisor_cli.py's module start): its processes are mostly one core
busy (pip, then one interpreter at a time), and those tests leave the second core idle. It never
overlaps the timed calibration tests (test_advisor_calibrate.py runs before that module).

The venv sees the system's site-packages, so torch (huge) and the other dependencies are not
downloaded: pip runs with --no-index (it can never fetch anything, least of all a bare 'torch')
and --no-build-isolation (the build uses the installed torch and scikit-build-core). The build
reuses build/<wheel tag> in the repository, so it is incremental, and builds the wheel's one
compiled target, _C: that folder may be configured with the C++ unit tests (scripts/setup.sh),
which the wheel does not hold and which took as long again to compile whenever csrc/ had changed
(30 Nov 2026: 4.4 min for the whole build, the tests' objects compiling beside the bindings). The
venv is made without pip (no ensurepip: seconds, and no bundled old setuptools); the system's pip,
which it sees, installs into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

CHECK = textwrap.dedent("""
    import importlib.metadata as md, json, disttrain
    from disttrain.advisor.loading import SHIPPED_LOGS
    print(json.dumps({"file": disttrain.__file__, "logs": str(SHIPPED_LOGS),
                      "csvs": len(list(SHIPPED_LOGS.glob("runs/*.csv"))),
                      "license": (SHIPPED_LOGS / "LICENSE").is_file(),
                      "version": md.version("disttrain"), "__version__": disttrain.__version__}))
""")


class StepFailed(AssertionError):
    pass


class Job:
    """The install and its checks, in a daemon thread; ``result()`` waits for them."""

    def __init__(self, folder: Path, repo: Path):
        self.folder = folder
        self.repo = repo
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("DISTTRAIN_EPOCH_LOGS", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
                    and not k.startswith("PIP_")}
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.timings: dict[str, float] = {}
        self._outcome: dict | BaseException | None = None
        self._running: list[subprocess.Popen] = []
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="fresh-install", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._outcome = self._run()
        except BaseException as e:  # handed to the test that reads the result
            self._outcome = e

    def _step(self, name: str, argv: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        start = time.monotonic()
        with self._lock:
            if self._stopped:
                raise StepFailed(f"{name}: not started (the session ended)")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                    env=self.env)
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
        if proc.returncode != 0:
            raise StepFailed(f"{name} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def _run(self) -> dict:
        venv = self.folder / "venv"
        work = self.folder / "elsewhere"
        work.mkdir(parents=True)
        python = str(venv / "bin" / "python")
        # --without-pip: Python 3.11's ensurepip would also bundle an old setuptools (65.x) that shadows
        # the system's, and torch requires setuptools>=77 (with --no-index pip could not upgrade it).
        self._step("venv", [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], 300,
                   work)
        self._step("pip install", [python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                                   "--config-settings=build.targets=_C", f"{self.repo}[advisor]"], 1200, work)
        info = json.loads(self._step("check", [python, "-c", CHECK], 300, work).stdout)
        advise = self._step("advise", [str(venv / "bin" / "disttrain"), "advise", "--model", "resnet50",
                                       "--target-acc", "0.8", "--json"], 600, work)
        return {"venv": venv, "info": info, "advise": advise.stdout}

    def result(self, timeout: float) -> dict:
        """What the job found ({'venv', 'info', 'advise'}); raises what it raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise StepFailed(f"the fresh install is not done after {timeout} s (steps done: {self.timings})")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def stop(self) -> None:
        """Ends a job still running (a session that did not wait for it): its processes are killed."""
        with self._lock:
            self._stopped = True
            for proc in self._running:
                proc.kill()
        self._thread.join(60)
