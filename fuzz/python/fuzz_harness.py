"""Shared driver of the atheris targets in this folder (scripts/fuzz.sh runs them).

A target module ``<name>_fuzzer.py`` defines ``test_one_input(data: bytes)``,
which returns when the code under test accepted the input or refused it with
one of its documented errors, and raises anything else (a crash).

    python3 fuzz/python/fuzz_harness.py NAME [libFuzzer options] [corpus folders]
    python3 fuzz/python/fuzz_harness.py NAME --replay FILE...

runs it under atheris with coverage of the disttrain modules it exercises
(imported here first, inside atheris' instrumentation, so the target must not
be the main script), or runs only the given inputs (the regression tests).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import torch  # noqa: F401  (imported before instrumentation: torch itself is not fuzzed)


# The disttrain modules each target exercises: atheris instruments these.
INSTRUMENTED = {
    "snapshot_load": ["disttrain.snapshot"],
    "fsdp_manifest": ["disttrain.fsdp", "disttrain.snapshot"],
    "decentralised_control": ["disttrain.strategies.decentralised"],
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in INSTRUMENTED:
        raise SystemExit(f"usage: {argv[0]} {{{','.join(INSTRUMENTED)}}} [--replay FILE... | libFuzzer arguments]")
    target, args = argv[1], argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args and args[0] == "--replay":
        fn: Callable[[bytes], None] = importlib.import_module(f"{target}_fuzzer").test_one_input
        for path in args[1:]:
            with open(path, "rb") as f:
                fn(f.read())
        print(f"replayed {len(args) - 1} input(s): no crash")
        return
    import atheris
    with atheris.instrument_imports(include=INSTRUMENTED[target]):
        for name in INSTRUMENTED[target]:
            importlib.import_module(name)
    fn = importlib.import_module(f"{target}_fuzzer").test_one_input
    atheris.Setup([argv[0]] + args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
