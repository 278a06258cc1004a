"""The advisor's optional dependencies (the ``advisor`` extra): checked
before anything imports them, so a missing one is one clear line, not a
traceback from deep inside a model."""

from __future__ import annotations

import importlib

# import name -> distribution name (what pip installs)
REQUIRED = {"pandas": "pandas", "lightgbm": "lightgbm", "scipy": "scipy", "sklearn": "scikit-learn"}
INSTALL_HINT = "pip install 'disttrain[advisor]'"


def missing_dependencies(modules: tuple[str, ...] | None = None) -> list[str]:
    """Distribution names of the advisor's dependencies (or of those among ``modules``, module
    names) that cannot be imported."""
    missing = []
    for module, distribution in REQUIRED.items():
        if modules is not None and module not in modules:
            continue
        try:
            importlib.import_module(module)
        except (ImportError, OSError):  # OSError: e.g. lightgbm without its OpenMP runtime
            missing.append(distribution)
    return missing


def missing_message(missing: list[str]) -> str:
    """One line: what is missing and how to install it."""
    return (f"the advisor needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            f"install the advisor's dependencies with: {INSTALL_HINT}")


class AdvisorDependencyError(ImportError):
    """An optional dependency of the advisor is missing."""


def require() -> None:
    """Raises AdvisorDependencyError (an ImportError) naming what is missing and the install hint."""
    missing = missing_dependencies()
    if missing:
        raise AdvisorDependencyError(missing_message(missing))
