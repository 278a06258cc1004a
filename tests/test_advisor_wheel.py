"""The advisor as an installed, optional part of disttrain: its dependencies are
an extra that ``import disttrain`` does not touch, a missing one is one line
with the install hint, the version has one source, and a fresh
``pip install '.[advisor]'`` runs ``disttrain advise`` from anywhere, on the
epoch logs shipped in the package.

Its checks are processes run in the background from earlier modules' starts (the import checks from
test_advisor.py's, the fresh install from test_advisor_cli.py's); this module's name puts it after the
advisor's other modules, whose in-process tests leave those processes a core."""

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest

import disttrain

from advisor_import_checks import ADVISOR_DEPENDENCIES

REPO = Path(__file__).resolve().parents[1]
HINT = "pip install 'disttrain[advisor]'"


@pytest.fixture(scope="module")
def checks(advisor_import_checks):
    """Each check is a fresh interpreter (tests/advisor_import_checks.py), run in the background from
    test_advisor.py's start (conftest's ``advisor_import_checks``): each test reads its own."""
    return advisor_import_checks.result(timeout=900)


def _commands(checks, blocked) -> dict:
    """The results of a blocked check's commands (each [status, stdout, stderr]) and 'api'."""
    out = checks[blocked]
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return json.loads(out.stdout)


def test_import_disttrain_imports_no_advisor_dependency(checks):
    out = checks["import"]
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
