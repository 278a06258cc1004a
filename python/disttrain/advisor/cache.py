"""A cache of fitted advisors, keyed by what the fit depends on.

Fitting takes seconds to tens of seconds (thousands of small least-squares
problems and LightGBM models); ``disttrain advise`` used to pay that on every
call. A fit is a pure function of its training files, the coverage, the
advisor's code and the versions of the libraries it runs on, so its result is
kept under a key hashed from exactly these:

- every training CSV's bytes, in reading order (a changed, added or removed
  file is a new key). Not their paths: a fit depends on what the files hold,
  and the same files elsewhere (the logs a fresh install ships, a copied runs
  folder) are the same fit;
- the coverage;
- the source of every module of ``disttrain.advisor`` and the versions of
  Python, NumPy, pandas, SciPy, scikit-learn and LightGBM.

Where: ``$DISTTRAIN_ADVISOR_CACHE`` (a folder; ``off`` or ``0`` disables the
cache), else ``$XDG_CACHE_HOME/disttrain/advisor``, else
``~/.cache/disttrain/advisor``. The folder is created private (0700); a folder
or file that another user owns or can write is never read (a pickle runs
code when loaded) and the fit runs instead. Entries are written to an
exclusive temporary file in the folder and renamed into place, so processes
fitting at the same time never see a torn file: each either reads a complete
entry or fits and writes its own (the last rename wins; both are equal). A
file that does not load (truncated, foreign, from other library versions) is
fitted again and replaced. The newest ``KEEP`` entries are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
import sys
from pathlib import Path

from .._atomic import write_atomically

ENV_VAR = "DISTTRAIN_ADVISOR_CACHE"
KEEP = 8
_OFF = {"0", "off", "no", "false", "none"}
_LIBRARIES = ("numpy", "pandas", "scipy", "sklearn", "lightgbm")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``$DISTTRAIN_ADVISOR_CACHE`` turns the cache off."""
    value = os.environ.get(ENV_VAR)
    if value is not None and value.strip().lower() in _OFF | {""}:
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "disttrain" / "advisor"


def _code_fingerprint() -> bytes:
    """The advisor's sources and the versions of what it runs on."""
    import importlib

    h = hashlib.sha256()
    h.update(sys.version.encode())
    for name in _LIBRARIES:
        module = importlib.import_module(name)
        h.update(f"{name}={getattr(module, '__version__', '?')};".encode())
    here = Path(__file__).resolve().parent
    for source in sorted(here.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return h.digest()


def fit_key(files: list[Path], coverage: float) -> str:
    """The cache key of a fit on ``files`` (CSV paths, in reading order): their bytes, not
    their paths (each file's length delimits it, so where one file ends is part of the key)."""
    h = hashlib.sha256(_code_fingerprint())
    h.update(repr(float(coverage)).encode())
    for path in files:
        data = path.read_bytes()
        h.update(f"\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _private_dir(folder: Path) -> bool:
    """Creates ``folder`` (0700) if needed; True when it is a real folder that
    this user owns and nobody else can write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _load(path: Path):
    """The advisor in ``path``, or None (missing, not ours, not loadable)."""
    from .advisor import Advisor

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        with os.fdopen(fd, "rb") as f:
            fd = -1
            advisor = pickle.load(f)
    except Exception:  # a torn, foreign or outdated entry is refitted, whatever unpickling raised
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    return advisor if isinstance(advisor, Advisor) else None


def _store(folder: Path, path: Path, advisor) -> None:
    """Writes ``advisor`` to ``path`` atomically (exclusive temporary, fsync, rename); best effort."""
    try:
        write_atomically(path, lambda f: pickle.dump(advisor, f, protocol=pickle.HIGHEST_PROTOCOL), binary=True)
    except OSError:
        return
    entries = sorted(folder.glob("advisor-*.pkl"), key=_mtime, reverse=True)
    for old in entries[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _mtime(path: Path) -> float:
    """A file's modification time; 0 for one that another process removed meanwhile."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def cached_fit(paths=None, coverage: float = 0.8):
    """``Advisor.fit(paths, coverage)``, read from the cache when the same fit
    was made before (see the module's docstring for the key and the folder).

    Returns:
        (advisor, hit): the fitted advisor, and whether it came from the cache.
    """
    from .advisor import Advisor
    from .loading import csv_files

    folder = cache_dir()
    if folder is None or not _private_dir(folder):
        return Advisor.fit(paths, coverage=coverage), False
    path = folder / f"advisor-{fit_key(csv_files(paths), coverage)}.pkl"
    advisor = _load(path)
    if advisor is not None:
        return advisor, True
    advisor = Advisor.fit(paths, coverage=coverage)
    _store(folder, path, advisor)
    return advisor, False
