"""The import checks of test_advisor_wheel.py: fresh interpreters (what each imports is the point),
most of each one's time torch's import. They run one after another in the background
(background.Job), started at test_advisor.py's start when the tests reading them are to run: the
in-process tests there keep one core busy, these the other (run all at once, they took the core of
the tests too). Their result: each check's CompletedProcess, by name ('import', 'pandas', 'lightgbm')."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import background
from harness import package_pythonpath

REPO = Path(__file__).resolve().parents[1]
ADVISOR_DEPENDENCIES = ("pandas", "lightgbm", "scipy")


def _import_check() -> str:
    return f"""
        import json, sys
        deps = {ADVISOR_DEPENDENCIES!r}
        seen = {{}}
        import disttrain
        seen["disttrain"] = [m for m in deps if m in sys.modules]
        import disttrain.cli, disttrain.advisor
        from disttrain.advisor import AdvisorInputError
        seen["disttrain.advisor"] = [m for m in deps if m in sys.modules]
        from disttrain.advisor import Advisor
        seen["Advisor"] = [m for m in deps if m in sys.modules]
        print(json.dumps(seen))
    """


def _blocked_check(blocked: str, commands: dict) -> str:
    """One interpreter with ``blocked`` missing: each command's exit status, stdout and stderr (JSON),
    then what importing the API raised. sys.modules[name] = None makes 'import name' fail as if it were
    not installed. The commands run in turn (each interpreter is mostly torch's import: fewer, quicker);
    the process's own stderr must stay empty."""
    return f"""
        import contextlib, io, json, sys
        sys.modules[{blocked!r}] = None
        from disttrain.cli import main
        results = {{}}
        for name, argv in {commands!r}.items():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code
            results[name] = [code, out.getvalue(), err.getvalue()]
        try:
            from disttrain.advisor import Advisor
        except ImportError as e:
            results["api"] = str(e)
        print(json.dumps(results))
    """


def start(folder: Path) -> background.Job:
    # The environment now (the session's fit cache), not a later test's (a monkeypatched one).
    env = dict(os.environ, PYTHONPATH=package_pythonpath())  # the same disttrain as the tests
    rows = folder / "metrics.csv"
    rows.write_text("epoch,epoch_timings,model_name,gpu,batch_size\n0,10.0,resnet18,Tesla P40,128\n")
    advise = ["advise", "--model", "resnet50", "--target-acc", "0.8"]
    checks = {"import": (_import_check(), env),
              "pandas": (_blocked_check("pandas", {"advise": advise, "help": ["advise", "--help"]}), env),
              "lightgbm": (_blocked_check("lightgbm", {"advise": advise, "predict": ["advise", "--predict", str(rows)]}),
                           dict(env, DISTTRAIN_ADVISOR_CACHE="off"))}

    def body(step) -> dict:
        return {name: step(name, [sys.executable, "-c", textwrap.dedent(code)], 300, REPO, environ, check=False)
                for name, (code, environ) in checks.items()}

    return background.Job("the advisor's import checks", body)
