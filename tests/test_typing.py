"""Static typing of the package.

* python/disttrain/_C.pyi matches the built extension: mypy's stubtest checks names, classes,
  bases, properties and variables; pybind11 functions carry no inspectable signature, so
  the parameters, defaults and return types are compared with the signature pybind11 writes
  into each docstring.
* mypy finds no errors in python/disttrain.

Both mypy runs read mypy.ini at the repository root, which points mypy at the sources under
python/; the runtime side is the disttrain._C the other tests import (the installed build).
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "mypy.ini")
STUB = os.path.join(ROOT, "python", "disttrain", "_C.pyi")
ALLOWLIST = os.path.join(ROOT, "tests", "stubtest_allowlist.txt")

def _require_mypy() -> None:
    # mypy is in the dev extra that scripts/setup.sh installs: its absence is a set-up failure, not a skip.
    assert importlib.util.find_spec("mypy") is not None, "mypy is not installed: pip install '.[dev]'"


needs_mypy = pytest.mark.usefixtures("_mypy_installed")


@pytest.fixture
def _mypy_installed() -> None:
    _require_mypy()


def _run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@needs_mypy
def test_stubtest():
    proc = _run(["mypy.stubtest", "disttrain._C", "--mypy-config-file", CONFIG, "--allowlist", ALLOWLIST])
    if proc.returncode != 0:
        pytest.fail(f"stubtest failed (python/disttrain/_C.pyi against disttrain._C):\n{proc.stdout}", pytrace=False)


@needs_mypy
def test_mypy_package():
    proc = _run(["mypy", "--config-file", CONFIG])
    if proc.returncode != 0:
        pytest.fail(f"mypy found errors in python/disttrain:\n{proc.stdout}", pytrace=False)


# --- the stub's signatures against pybind11's ------------------------------------------------

# pybind11's spelling of a type -> the stub's (pybind11 3.x, and 2.x's older names).
_PYBIND_SPELLING = [
    (r"typing\.SupportsInt \| typing\.SupportsIndex", "int"),
    (r"typing\.SupportsFloat \| typing\.SupportsIndex", "float"),
    (r"\b(collections\.abc|typing|datetime|disttrain\._C|torch\.distributed\.distributed_c10d)\.", ""),
    (r"\bList\[", "list["), (r"\bDict\[", "dict["), (r"\bTuple\[", "tuple["),
    (r"\bOptional\[([^\[\]]+)\]", r"\1 | None"),
]
# Parameters where the stub is knowingly wider than pybind11's docstring.
_WIDER_PARAMETER = {"timedelta": "timedelta | float"}  # pybind11/chrono.h also converts float seconds


def _pybind_type(text: str, parameter: bool) -> str:
    for pattern, replacement in _PYBIND_SPELLING:
        text = re.sub(pattern, replacement, text)
    if parameter:  # pybind11 2.x writes list/dict for any sequence/mapping argument
        text = re.sub(r"^list\[", "Sequence[", re.sub(r"^dict\[", "Mapping[", text))
        text = _WIDER_PARAMETER.get(text, text)
    return text


def _split_top_level(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[({":
            depth += 1
        elif c in "])}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text.strip():
        parts.append(text[start:].strip())
    return parts


def _pybind_signature(obj) -> tuple[list[tuple[str, str, str | None]], str] | None:
    """((name, type, default) per parameter, return type) from pybind11's docstring, or None."""
    doc = ((obj.fget if isinstance(obj, property) else obj).__doc__ or "").strip()
    match = re.fullmatch(r"\w*\((?P<params>.*)\) -> (?P<ret>[^\n]+)", doc.split("\n\n")[0].split("\n")[0])
    if not match:
        return None
    params = []
    for part in _split_top_level(match["params"]):
        name, _, rest = part.partition(": ")
        annotation, _, default = rest.partition(" = ")
        params.append((name, _pybind_type(annotation, True), default or None))
    if params and (params[0][0] == "self" or isinstance(obj, property)):
        params = params[1:]
    return params, _pybind_type(match["ret"], False)


def _stub_signatures() -> dict[str, tuple[list[tuple[str, str, str | None, bool]], str]]:
    """Qualified name -> ((name, type, default, positional-only) per parameter, return type)."""
    tree = ast.parse(open(STUB).read())
    aliases = {node.targets[0].id: ast.unparse(node.value) for node in tree.body
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}

    def text(node: ast.expr | None) -> str:
        out = "" if node is None else ast.unparse(node)
        for alias, value in aliases.items():
            out = re.sub(rf"\b{alias}\b", value, out)
        return out

    def signature(fn: ast.FunctionDef, method: bool):
        positional = fn.args.posonlyargs + fn.args.args
        defaults = [None] * (len(positional) - len(fn.args.defaults)) + list(fn.args.defaults)
        params = [(a.arg, text(a.annotation), None if d is None else ast.unparse(d), a in fn.args.posonlyargs)
                  for a, d in zip(positional, defaults)]
        assert not fn.args.kwonlyargs and not fn.args.vararg and not fn.args.kwarg, fn.name
        return params[1:] if method else params, text(fn.returns)

    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = signature(node, False)
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    out[f"{node.name}.{member.name}"] = signature(member, True)
    return out


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except ValueError:
        return text


def _differences(qualname: str, stub, runtime) -> list[str]:
    (stub_params, stub_ret), (params, ret) = stub, runtime
    problems = []
    if len(stub_params) != len(params):
        problems.append(f"{len(stub_params)} parameters in the stub, {len(params)} bound: "
                        f"{[p[0] for p in stub_params]} vs {[p[0] for p in params]}")
    for (s_name, s_type, s_default, s_posonly), (name, annotation, default) in zip(stub_params, params):
        unnamed = re.fullmatch(r"arg\d+", name) is not None  # bound without py::arg: positional-only
        if unnamed != s_posonly or (not unnamed and s_name != name):
            problems.append(f"parameter {s_name!r}{' (positional-only)' * s_posonly} is bound as {name!r}")
        if s_type.replace(" ", "") != annotation.replace(" ", ""):
            problems.append(f"parameter {s_name!r}: stub {s_type}, bound {annotation}")
        if (s_default is None) != (default is None) or (
                default is not None and _literal(str(s_default)) != _literal(default)):
            problems.append(f"parameter {s_name!r}: stub default {s_default}, bound default {default}")
    # py::list / py::dict / py::tuple results are untyped to pybind11: only the container is checked.
    untyped = ret in ("list", "dict", "tuple") and stub_ret.startswith(ret + "[")
    if not untyped and stub_ret.replace(" ", "") != ret.replace(" ", ""):
        problems.append(f"returns {stub_ret} in the stub, {ret} bound")
    return [f"{qualname}: {p}" for p in problems]


def test_stub_signatures_match_bindings():
    import disttrain._C as runtime_module

    problems, compared = [], 0
    for qualname, stub in sorted(_stub_signatures().items()):
        owner, _, member = qualname.rpartition(".")
        scope = vars(getattr(runtime_module, owner, object)) if owner else vars(runtime_module)
        obj = scope.get(member)
        runtime = None if obj is None else _pybind_signature(obj)
        if runtime is None:
            problems.append(f"{qualname}: no pybind11 signature in its docstring")
            continue
        compared += 1
        problems += _differences(qualname, stub, runtime)
    assert compared > 50, compared
    if problems:
        pytest.fail("python/disttrain/_C.pyi differs from csrc/bindings (as built):\n" + "\n".join(problems),
                    pytrace=False)
