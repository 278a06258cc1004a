"""``disttrain`` command line: ``disttrain train | bench | advise | info``.

Each command lives in its own module with a ``main(argv) -> int``; this file
only dispatches, so a command's imports cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from typing import Any

COMMANDS = {
    "info": ("disttrain.info", "versions, how the extension was built, transports a job would use"),
    "train": ("disttrain.train_cli", "fault-tolerant data-parallel training with snapshots (the snapshot trainer)"),
    "bench": ("disttrain.bench", "benchmarks against the PyTorch equivalent (allreduce, ...)"),
    "advise": ("disttrain.advisor.cli", "training-cost advisor: time, accuracy, cheapest configuration"),
}


def _usage() -> str:
    lines = ["usage: disttrain COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run 'disttrain COMMAND --help' for a command's options."]
    return "\n".join(lines)


# --- disttrain bench: every option value checked before a benchmark starts a rank ------------------

class _BadOption(ValueError):
    pass


# Option names (argparse dests) shared by the benchmarks, and what each accepts.
_COUNT_LISTS = {"ranks", "processes"}        # comma-separated whole numbers >= 1
_NUMBER_LISTS = {"sizes", "stream_sizes"}    # comma-separated counts, 1e6 notation allowed, >= 1
_ZERO_OK = {"warmup", "iters", "eval_ranks", "seed", "mlp_depth", "workers", "kill_mb", "node_rank"}  # whole numbers >= 0; other ints >= 1
_ZERO_OK_FLOATS = {"delay_ms", "min_free_gb"}  # numbers >= 0 (no delay, no free-space floor); other floats > 0
_OUTPUT_FILES = {"out", "csv", "peers_csv", "kill_csv"}  # files written: in an existing folder or one that can be made
_OUTPUT_FOLDERS = {"trace", "keep"}          # folders written: existing or one that can be made
_FOLDERS = {"dir"}                           # existing folders
_RANK_COUNTS = {"nproc", "ranks", "processes"}  # processes a benchmark starts on this host
_FRACTIONS = {"resume_at", "kill_at"}        # fractions of an epoch or a checkpoint, in (0, 1]
# Private memory a rank takes at least once it has imported torch (measured: about 145 MiB): more
# ranks than the machine's memory holds at that size can only thrash and be killed, never run.
_RANK_MEMORY = 128 << 20


def _max_ranks() -> tuple[int, int]:
    """(the most ranks this host's memory can hold, that memory in bytes)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 31, 0
    return max(1, memory // _RANK_MEMORY), memory


def check_ranks(option: str, ranks: int) -> None:
    """Raises ValueError (a benchmark's ``check_args`` may call it) when ``ranks``
    processes on this host cannot fit in its memory."""
    limit, memory = _max_ranks()
    if ranks > limit:
        raise _BadOption(f"{option} {ranks}: more ranks than this machine can hold ({memory / 2**30:.1f} GiB of "
                         f"memory, at least {_RANK_MEMORY >> 20} MiB a rank: at most {limit})")


def _option(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def _check_output(option: str, path: str, folder: bool = False) -> None:
    if os.path.isdir(path) and not folder:
        raise _BadOption(f"{option} '{path}' is a folder; expected a file to write")
    if os.path.exists(path) and folder and not os.path.isdir(path):
        raise _BadOption(f"{option} '{path}' is a file; expected a folder to write in")
    parent = os.path.abspath(path if folder else os.path.dirname(path) or ".")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    writable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)
    if writable:  # a file made there is the only sure test: root passes access() on a read-only mount or /proc
        try:
            fd, probe = tempfile.mkstemp(prefix=".disttrain-write-test-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError:
            writable = False
    if not writable:
        raise _BadOption(f"{option} '{path}': '{parent}' is not a writable folder; expected "
                         f"{'a folder that is or can be made' if folder else 'a file in one'}")


def _check_bench_value(module: Any, dest: str, option: str, value: Any, backends: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, list):  # nargs="+"
        for item in value:
            _check_bench_value(module, dest, option, item, backends)
        return
    if dest in _COUNT_LISTS or dest in _NUMBER_LISTS:
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        try:
            numbers = [float(x) for x in items]
        except ValueError:
            numbers = []
        whole = all(n.is_integer() for n in numbers) and (dest in _NUMBER_LISTS or all(x.isdigit() for x in items))
        if not numbers or not whole or any(n < 1 or not math.isfinite(n) for n in numbers):
            raise _BadOption(f"{option} {value!r}: expected whole numbers >= 1, comma separated (e.g. 2,4)")
        if dest in _RANK_COUNTS:
            check_ranks(option, int(max(numbers)))
        return
    known = getattr(module, dest.upper(), None)  # --configs: CONFIGS, --models: MODELS, --peers: PEERS
    if isinstance(known, (tuple, list, dict)) and isinstance(value, str):
        # A bench may name variants of its known values (bench ddp: a bucket size, disttrain@MB/...).
        base = getattr(module, f"base_{dest}", lambda x: x)
        unknown = [x for x in (x.strip() for x in value.split(",")) if x and base(x) not in known]
        if unknown or (dest != "peers" and not value.strip(",").strip()):
            raise _BadOption(f"{option} {value!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                             f"choose from {', '.join(known)}")
        return
    if dest == "grid":
        try:
            points = [(float(a), float(b)) for a, b in (item.split(":") for item in str(value).split(",") if item)]
        except ValueError:
            points = []
        if not points or any(lr <= 0 or not 0 <= m < 1 for lr, m in points):
            raise _BadOption(f"{option} {value!r}: expected lr:momentum pairs with lr > 0 and 0 <= momentum < 1, "
                             "comma separated (e.g. 0.1:0.9,0.05:0.5)")
        return
    if dest == "baseline" and value not in backends:
        raise _BadOption(f"{option} {value!r}: not available here; choose from {', '.join(backends)}")
    if dest in _OUTPUT_FILES or dest in _OUTPUT_FOLDERS:
        _check_output(option, str(value), folder=dest in _OUTPUT_FOLDERS)
    if dest in _FOLDERS and not os.path.isdir(value):
        raise _BadOption(f"{option} '{value}': no such folder; expected an existing folder")
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        minimum = 2 if dest == "factor" else 0 if dest in _ZERO_OK else 1
        if value < minimum:
            raise _BadOption(f"{option} {value}: expected a whole number >= {minimum}")
        if dest in _RANK_COUNTS:
            check_ranks(option, value)
    elif isinstance(value, float):
        if dest in _FRACTIONS:
            if not 0 < value <= 1:
                raise _BadOption(f"{option} {value:g}: expected a fraction in (0, 1]")
        elif dest == "target":
            if not 0 < value <= 1:
                raise _BadOption(f"{option} {value:g}: expected an accuracy in (0, 1]")
        elif dest == "momentum":
            if not 0 <= value < 1:
                raise _BadOption(f"{option} {value:g}: expected 0 <= momentum < 1")
        elif dest in _ZERO_OK_FLOATS:
            if not math.isfinite(value) or value < 0:
                raise _BadOption(f"{option} {value:g}: expected a number >= 0")
        elif not math.isfinite(value) or value <= 0:
            raise _BadOption(f"{option} {value:g}: expected a number > 0")


def _check_bench(argv: list[str]) -> str | None:
    """The first bad option of ``disttrain bench NAME ...`` as one line, or None."""
    from .bench import BENCHMARKS
    from .train_cli import _backends

    if not argv or argv[0] not in BENCHMARKS:
        return None  # the dispatcher's own message (usage, unknown benchmark)
    module = importlib.import_module(BENCHMARKS[argv[0]])
    if not hasattr(module, "build_parser"):
        return None
    parser = module.build_parser()

    def error(message: str):
        raise _BadOption(message)

    parser.error = error  # one line, not argparse's usage block
    takes_name = any(a.dest == "op" for a in parser._actions)  # collectives: the name is its positional
    try:
        args = parser.parse_args(argv if takes_name else argv[1:])
        if getattr(args, "min_bytes", None) is not None and getattr(args, "max_bytes", None) is not None \
                and args.min_bytes > args.max_bytes:
            raise _BadOption(f"-b/--min-bytes {args.min_bytes} is larger than -e/--max-bytes {args.max_bytes}")
        backends = _backends()
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and action.dest != "help":
                _check_bench_value(module, action.dest, _option(action), getattr(args, action.dest, None), backends)
        check = getattr(module, "check_args", None)  # what only the benchmark knows (one option against another)
        if check is not None:
            try:
                check(args, backends)
            except ValueError as e:
                raise _BadOption(str(e)) from None
    except _BadOption as e:
        return f"disttrain bench {argv[0]}: error: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"disttrain: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "bench":
        bad = _check_bench(rest)
        if bad is not None:
            print(bad, file=sys.stderr)
            return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
