"""``disttrain`` command line: ``disttrain train | bench | advise | info``.

Each command lives in its own module with a ``main(argv) -> int``; this file
only dispatches, so a command's imports cost nothing to the others.
"""

from __future__ import annotations

import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"disttrain: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
