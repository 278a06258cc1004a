"""The suite's own set-up can fail: its timeouts are consistent (a
multi-process test's harness timeout, run_ranks(timeout=...), which reports
the ranks that hang and stops them, fires before pytest-timeout's, which kills
the test with only a thread dump), and scripts/run_tests.sh and
scripts/setup.sh fail loudly without GoogleTest instead of skipping the C++
unit tests in silence."""

import ast
import glob
import os
import re
import shutil
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run_ranks stops the ranks with a grace of 5 s after its timeout; then it reports.
MARGIN_S = 30


def _ini_timeout():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    return float(re.search(r"^timeout\s*=\s*([\d.]+)", section, re.M).group(1))


def _mark_timeout(function):
    for decorator in function.decorator_list:
        if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.timeout":
            return float(ast.literal_eval(decorator.args[0]))
    return None


def _harness_timeouts():
    """(file:line, test function, harness timeout) for every run_ranks call with a literal timeout."""
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "run_ranks":
                    for kw in call.keywords:
                        if kw.arg == "timeout" and isinstance(kw.value, ast.Constant):
                            yield f"{os.path.basename(path)}:{call.lineno}", node, float(kw.value.value)


def test_harness_timeouts_fire_before_pytest_timeout():
    ini = _ini_timeout()
    found = list(_harness_timeouts())
    assert found, "no run_ranks(timeout=...) found: the scan is broken"
    bad = [f"{where} ({function.name}): run_ranks timeout {timeout:.0f} s + {MARGIN_S} s > pytest timeout "
           f"{(_mark_timeout(function) or ini):.0f} s"
           for where, function, timeout in found if timeout + MARGIN_S > (_mark_timeout(function) or ini)]
    assert not bad, "\n".join(bad)


def _stub(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _script_tree(tmp_path):
    """A copy of scripts/ in an empty checkout, with stubs on PATH: dpkg finds no
    package (no GoogleTest), id says not root, the Python interpreter only logs
    its arguments."""
    tree = tmp_path / "checkout"
    (tree / "scripts").mkdir(parents=True)
    for name in ("run_tests.sh", "setup.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), tree / "scripts" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "python.log"
    _stub(bin_dir, "dpkg", "exit 1")
    _stub(bin_dir, "id", "echo 1000")
    _stub(bin_dir, "ip", "exit 0")
    _stub(bin_dir, "chromium", "exit 0")
    python = _stub(bin_dir, "python-stub", f'echo "$@" >> {log}; exit 0')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(python), "HOME": str(tmp_path)}
    return tree, env, log


def test_run_tests_fails_loudly_without_the_cpp_tests(tmp_path):
    tree, env, log = _script_tree(tmp_path)
    _stub(tree / "scripts", "setup.sh", "exit 0")  # set-up done; no C++ test binary was built
    out = subprocess.run(["bash", str(tree / "scripts" / "run_tests.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "FAILED" in out.stderr and "GoogleTest (libgtest-dev) is not installed" in out.stderr
    assert not log.exists() or "pytest" not in log.read_text()  # the Python tests did not run as if all was well


def test_setup_fails_loudly_when_it_cannot_install_googletest(tmp_path):
    tree, env, log = _script_tree(tmp_path)
    out = subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "GoogleTest (libgtest-dev) is not installed" in out.stderr
    assert ".[dev]" not in (log.read_text() if log.exists() else "")  # no build without the C++ tests
