"""The frozen development holdout: configurations of the epoch logs that no
design choice of the advisor is scored on (issue 21).

Chosen once, at random, before the work on out-of-range inputs, the physical
fallback and calibration began: a configuration (``config_id``, all its GPU
types together) is held out when the first 8 hex digits of
``sha256(SALT + config_id)``, read as an integer and divided by 2**32, are
below ``FRACTION``. The rule gave 9 of the 31 configurations (16 of the 61
runs); they are frozen in ``holdout.json`` beside this file, which the
evaluation reads (the rule is kept to show how the list was drawn, not
re-drawn: a new log file does not move a configuration into or out of it).

``disttrain advise --evaluate`` cross-validates (the splits that design
choices were and are scored on) on the other configurations only, and scores
the holdout once, with the advisor fitted on all the other runs.

    python -m disttrain.advisor.holdout          # prints the rule's draw on the default logs
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SALT = "disttrain-advisor-holdout-v1:"
FRACTION = 0.2
HOLDOUT_FILE = Path(__file__).resolve().parent / "holdout.json"


def drawn(config_id: str) -> bool:
    """Whether the rule holds ``config_id`` out (how the frozen list was drawn)."""
    digest = hashlib.sha256((SALT + str(config_id)).encode()).hexdigest()
    return int(digest[:8], 16) / 2 ** 32 < FRACTION


def holdout_configs() -> frozenset[str]:
    """The frozen list: the ``config_id`` values of the holdout (holdout.json)."""
    with open(HOLDOUT_FILE) as f:
        return frozenset(json.load(f)["config_ids"])


def main() -> None:
    from .loading import load_epochs, runs_table

    runs = runs_table(load_epochs())
    configs = sorted(c for c in runs["config_id"].unique() if drawn(c))
    held = runs[runs["config_id"].isin(configs)]
    print(json.dumps({"rule": f"sha256('{SALT}' + config_id)[:8] / 2**32 < {FRACTION}",
                      "config_ids": configs, "run_ids": sorted(held["run_id"])}, indent=1))


if __name__ == "__main__":
    main()
