"""The advisor as an installed, optional part of disttrain: its dependencies are
an extra that ``import disttrain`` does not touch, a missing one is one line
with the install hint, the version has one source, and a fresh
``pip install '.[advisor]'`` runs ``disttrain advise`` from anywhere, on the
epoch logs shipped in the package."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import disttrain

REPO = Path(__file__).resolve().parents[1]
# Subprocesses run the same disttrain as this test: installed, or the checkout's python/.
PACKAGE_PARENT = str(Path(disttrain.__file__).resolve().parents[1])
ADVISOR_DEPENDENCIES = ("pandas", "lightgbm", "scipy")
HINT = "pip install 'disttrain[advisor]'"


def _start(code: str, *, env=None) -> subprocess.Popen:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def _finished(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


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


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Each check below is a fresh interpreter (what it imports is the point), most of its time
    importing torch: all are started at once, on the machine's cores, and each test reads its own."""
    rows = tmp_path_factory.mktemp("predict") / "metrics.csv"
    rows.write_text("epoch,epoch_timings,model_name,gpu,batch_size\n0,10.0,resnet18,Tesla P40,128\n")
    advise = ["advise", "--model", "resnet50", "--target-acc", "0.8"]
    started = {"import": _start(_import_check()),
               "pandas": _start(_blocked_check("pandas", {"advise": advise, "help": ["advise", "--help"]})),
               "lightgbm": _start(_blocked_check("lightgbm", {"advise": advise, "predict": ["advise", "--predict", str(rows)]}),
                                  env=dict(os.environ, DISTTRAIN_ADVISOR_CACHE="off"))}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _commands(checks, blocked) -> dict:
    """The results of a blocked check's commands (each [status, stdout, stderr]) and 'api'."""
    out = _finished(checks[blocked])
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return json.loads(out.stdout)


def test_import_disttrain_imports_no_advisor_dependency(checks):
    out = _finished(checks["import"])
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["disttrain"] == [] and seen["disttrain.advisor"] == []
    assert seen["Advisor"] == list(ADVISOR_DEPENDENCIES)  # the check can see them when they are imported


@pytest.mark.parametrize("blocked", ["pandas", "lightgbm"])
def test_missing_dependency_is_one_line_with_the_install_hint(checks, blocked):
    results = _commands(checks, blocked)
    code, stdout, stderr = results["advise"]
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain advise: "), stderr
    assert blocked in lines[0] and HINT in lines[0]
    others = [d for d in ADVISOR_DEPENDENCIES if d != blocked]
    assert not any(d in lines[0] for d in others)  # names what is missing, not everything
    assert HINT in results["api"]


def test_predict_checks_the_model_dependencies_when_it_needs_the_model(checks):
    # --predict alone imports LightGBM, SciPy and scikit-learn only for a configuration the fitted
    # model predicts (a device calibrated here is measured); then a missing one is still one line.
    code, stdout, stderr = _commands(checks, "lightgbm")["predict"]
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "lightgbm" in lines[0] and HINT in lines[0], stderr


def test_help_needs_no_advisor_dependency(checks):
    code, stdout, stderr = _commands(checks, "pandas")["help"]
    assert code == 0 and "--no-default-logs" in stdout, stderr


def test_version_has_one_source():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["provider"] == "scikit_build_core.metadata.regex"
    source = (REPO / provider["input"]).read_text()
    assert re.search(r'^__version__ = "([^"]+)"', source, re.M).group(1) == disttrain.__version__


def _installed_metadata_is_this_checkout() -> bool:
    try:
        files = importlib.metadata.files("disttrain") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(Path(f.locate()).resolve() == Path(disttrain.__file__).resolve() for f in files)


@pytest.mark.skipif(not _installed_metadata_is_this_checkout(), reason="disttrain runs from the checkout, not installed")
def test_installed_metadata_version_and_advisor_extra():
    assert importlib.metadata.version("disttrain") == disttrain.__version__
    requires = importlib.metadata.requires("disttrain") or []
    core = [r for r in requires if "extra ==" not in r]
    advisor = [r for r in requires if re.search(r"""extra == ["']advisor["']""", r)]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    assert not {name.match(r).group(0).lower() for r in core} & {"pandas", "lightgbm", "scipy"}, core
    assert {name.match(r).group(0).lower() for r in advisor} >= {"pandas", "lightgbm", "scipy", "scikit-learn"}
    shipped = [str(f) for f in importlib.metadata.files("disttrain") if "advisor/epoch_logs/" in str(f)]
    assert sum(f.endswith(".csv") for f in shipped) == 126
    assert {"disttrain/advisor/epoch_logs/LICENSE", "disttrain/advisor/epoch_logs/ORIGIN.md"} <= set(shipped)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a cold build of the extension on 2 cores takes several minutes; warm, it is incremental
def test_fresh_venv_install_advises_outside_the_repository(fresh_install):
    """pip install '<repo>[advisor]' into a new virtual environment, then run
    ``disttrain advise`` from a folder outside the repository, without
    DISTTRAIN_EPOCH_LOGS: the shipped logs are found in the installed package.
    The install runs in the background (tests/fresh_install.py, conftest's
    ``fresh_install``), from test_advisor_cli.py's start when this test is to run."""
    found = fresh_install.result(timeout=1400)
    venv, info = found["venv"], found["info"]
    assert Path(info["file"]).resolve().is_relative_to(venv.resolve()), info  # the venv's copy, not the system's
    assert Path(info["logs"]).resolve().is_relative_to(venv.resolve()) and info["csvs"] == 126 and info["license"]
    assert info["version"] == info["__version__"] == disttrain.__version__
    # --json: a real process's stdout is the JSON document alone (nothing else printed there);
    # the table's layout is checked in test_advisor_cli.py, in-process.
    result = json.loads(found["advise"])
    assert result["configurations"] and result["units"]["cost"] == "USD", found["advise"][:2000]
    assert result["message"].startswith("cheapest:") and result["configurations"][0]["rank"] == 1
    print(f"fresh venv install timings (s): {fresh_install.timings}")
