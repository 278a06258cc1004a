"""``pip install '<repo>[advisor]'`` into a new virtual environment, then ``disttrain advise``
from a folder outside the repository, without DISTTRAIN_EPOCH_LOGS (the shipped logs must be found
in the installed package): test_advisor_wheel.py checks what it returns.

It runs in a thread of its own (background.Job), started by conftest's ``fresh_install`` fixture before the
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
import sys
import textwrap
from pathlib import Path

import background

CHECK = textwrap.dedent("""
    import importlib.metadata as md, json, disttrain
    from disttrain.advisor.loading import SHIPPED_LOGS
    print(json.dumps({"file": disttrain.__file__, "logs": str(SHIPPED_LOGS),
                      "csvs": len(list(SHIPPED_LOGS.glob("runs/*.csv"))),
                      "license": (SHIPPED_LOGS / "LICENSE").is_file(),
                      "version": md.version("disttrain"), "__version__": disttrain.__version__}))
""")


def start(folder: Path, repo: Path) -> background.Job:
    """The install and its checks as a background.Job; its result: {'venv', 'info', 'advise'}."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISTTRAIN_EPOCH_LOGS", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def body(step) -> dict:
        venv = folder / "venv"
        work = folder / "elsewhere"
        work.mkdir(parents=True)
        python = str(venv / "bin" / "python")
        # --without-pip: Python 3.11's ensurepip would also bundle an old setuptools (65.x) that shadows
        # the system's, and torch requires setuptools>=77 (with --no-index pip could not upgrade it).
        step("venv", [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], 300,
             work, env)
        step("pip install", [python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                             "--config-settings=build.targets=_C", f"{repo}[advisor]"], 1200, work, env)
        info = json.loads(step("check", [python, "-c", CHECK], 300, work, env).stdout)
        advise = step("advise", [str(venv / "bin" / "disttrain"), "advise", "--model", "resnet50",
                                 "--target-acc", "0.8", "--json"], 600, work, env)
        return {"venv": venv, "info": info, "advise": advise.stdout}

    return background.Job("the fresh install", body)
