"""The training-cost advisor: time per epoch, accuracy per epoch, and the
cheapest configuration to reach a target accuracy. See docs/advisor.md.

An optional part of disttrain: it needs pandas, LightGBM, SciPy and
scikit-learn (``pip install 'disttrain[advisor]'``). Importing this package
imports none of them; the names below load their module on first use, and
raise an ImportError with the install hint when a dependency is missing.
"""

from __future__ import annotations

import importlib

from .errors import AdvisorInputError

_LAZY = {
    "Advisor": ".advisor",
    "Recommendation": ".recommend",
    "default_data_path": ".loading",
    "data_sources": ".loading",
    "load_epochs": ".loading",
}

__all__ = ["Advisor", "AdvisorInputError", "Recommendation", "data_sources", "default_data_path", "load_epochs"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._deps import require

    require()
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
