"""The advisor's fit cache (disttrain.advisor.cache): a fit is reused only for the same
training files (bytes), coverage, code and library versions; entries appear atomically;
a broken or foreign entry is refitted, never trusted. The fits here are counted stand-ins
that return the session's real advisor, so no test pays for a fit of its own."""

import os
import pickle
import shutil

import pandas as pd
import pytest

from disttrain.advisor import Advisor
from disttrain.advisor import cache as advisor_cache
from disttrain.advisor.loading import SHIPPED_LOGS


@pytest.fixture(scope="module")
def fitted():
    return Advisor.fit(cache=True)


@pytest.fixture
def logs(tmp_path):
    """A few of the shipped logs, copied: files this test may change."""
    folder = tmp_path / "logs"
    folder.mkdir()
    for csv in sorted((SHIPPED_LOGS / "runs").glob("resnet18_*.csv"))[:6]:
        shutil.copy(csv, folder / csv.name)
    return folder


@pytest.fixture
def fits(monkeypatch, fitted, tmp_path):
    """Counts the real fits behind cached_fit; the cache lives in tmp_path/cache."""
    calls = []

    def fake_fit(paths=None, coverage=0.8, cache=False):
        assert not cache
        calls.append((paths, coverage))
        return fitted

    monkeypatch.setenv(advisor_cache.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(Advisor, "fit", staticmethod(fake_fit))
    return calls


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_same_files_hit_changed_files_miss(logs, fits, tmp_path):
    first, hit = advisor_cache.cached_fit(logs)
    assert not hit and len(fits) == 1
    again, hit = advisor_cache.cached_fit(logs)
    assert hit and len(fits) == 1 and isinstance(again, Advisor)
    configs = pd.DataFrame([{"model_name": "resnet50", "gpu": "P100", "batch_size": 32}])
    pd.testing.assert_frame_equal(first.predict(configs), again.predict(configs), check_exact=True)
    assert advisor_cache.cached_fit(logs, coverage=0.9)[1] is False  # another coverage: another fit
    # The same files in another folder (a fresh install's shipped logs, a copied runs folder): the same fit.
    elsewhere = tmp_path / "elsewhere" / "logs"
    shutil.copytree(logs, elsewhere)
    assert advisor_cache.cached_fit(elsewhere)[1] is True
    # The same bytes cut into files differently: another fit (rows are grouped by file).
    merged = tmp_path / "merged"
    merged.mkdir()
    first_two = sorted(logs.glob("*.csv"))[:2]
    (merged / "a.csv").write_bytes(first_two[0].read_bytes() + first_two[1].read_bytes())
    split = tmp_path / "split"
    split.mkdir()
    for i, csv in enumerate(first_two):
        shutil.copy(csv, split / f"{i}.csv")
    assert advisor_cache.fit_key([merged / "a.csv"], 0.8) != advisor_cache.fit_key(sorted(split.glob("*.csv")), 0.8)
    # One byte changed in one file: a new key, a new fit.
    victim = sorted(logs.glob("*.csv"))[0]
    victim.write_bytes(victim.read_bytes().replace(b"resnet18", b"resnet18 ", 1))
    assert advisor_cache.cached_fit(logs)[1] is False
    # A file added: a new key.
    shutil.copy(victim, logs / "copy.csv")
    assert advisor_cache.cached_fit(logs)[1] is False
    assert len(fits) == 4
    folder = tmp_path / "cache"
    assert len([n for n in _entries(folder) if n.startswith("advisor-")]) == 4
    assert not [n for n in _entries(folder) if n.endswith(".tmp")]
    assert (os.stat(folder).st_mode & 0o777) == 0o700


def test_the_key_covers_the_code_and_the_libraries(logs, monkeypatch):
    files = sorted(p.resolve() for p in logs.glob("*.csv"))
    key = advisor_cache.fit_key(files, 0.8)
    assert key == advisor_cache.fit_key(files, 0.8)
    monkeypatch.setattr(advisor_cache, "_code_fingerprint", lambda: b"another version of the advisor")
    assert advisor_cache.fit_key(files, 0.8) != key
    monkeypatch.undo()
    monkeypatch.setattr(advisor_cache, "_LIBRARIES", advisor_cache._LIBRARIES[:-1])  # lightgbm's version left out
    assert advisor_cache.fit_key(files, 0.8) != key


def test_a_torn_or_foreign_entry_is_refitted(logs, fits, tmp_path):
    advisor_cache.cached_fit(logs)
    [entry] = (tmp_path / "cache").glob("advisor-*.pkl")
    entry.write_bytes(entry.read_bytes()[:1000])  # torn
    assert advisor_cache.cached_fit(logs)[1] is False and len(fits) == 2
    assert advisor_cache.cached_fit(logs)[1] is True  # replaced by a whole one
    entry.write_bytes(pickle.dumps({"not": "an advisor"}))
    assert advisor_cache.cached_fit(logs)[1] is False and len(fits) == 3
    # Writable by others: never unpickled (a pickle runs code when loaded).
    advisor_cache.cached_fit(logs)
    entry.chmod(0o666)
    assert advisor_cache.cached_fit(logs)[1] is False and len(fits) == 4


def test_a_failed_write_leaves_no_entry_and_no_temporary(logs, fits, tmp_path, monkeypatch):
    def broken_dump(obj, f, protocol=None):
        f.write(b"half an advisor")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(advisor_cache.pickle, "dump", broken_dump)
    advisor, hit = advisor_cache.cached_fit(logs)
    assert isinstance(advisor, Advisor) and not hit  # the fit still comes back
    assert _entries(tmp_path / "cache") == []


def test_an_unsafe_folder_or_off_means_no_cache(logs, fits, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(advisor_cache.ENV_VAR, str(shared))
    assert advisor_cache.cached_fit(logs)[1] is False
    assert advisor_cache.cached_fit(logs)[1] is False and len(fits) == 2
    assert _entries(shared) == []
    monkeypatch.setenv(advisor_cache.ENV_VAR, "off")
    assert advisor_cache.cache_dir() is None
    assert advisor_cache.cached_fit(logs)[1] is False and len(fits) == 3
    monkeypatch.delenv(advisor_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert advisor_cache.cache_dir() == tmp_path / "xdg" / "disttrain" / "advisor"


def test_only_the_newest_entries_are_kept(logs, fits, tmp_path, monkeypatch):
    monkeypatch.setattr(advisor_cache, "KEEP", 2)
    for coverage in (0.5, 0.6, 0.7, 0.8):
        advisor_cache.cached_fit(logs, coverage=coverage)
    assert len(list((tmp_path / "cache").glob("advisor-*.pkl"))) == 2
    assert advisor_cache.cached_fit(logs, coverage=0.8)[1] is True


def test_processes_fitting_at_once_share_one_whole_entry(logs, fits, tmp_path):
    # Four processes (forked: each with this test's counted fit) reach the same missing entry at
    # once, each fits and writes; every one gets its advisor, one whole entry remains, no temporary.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)

    def worker(queue):
        barrier.wait(timeout=60)
        advisor, hit = advisor_cache.cached_fit(logs)
        queue.put(isinstance(advisor, Advisor))

    queue = context.Queue()
    procs = [context.Process(target=worker, args=(queue,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert results == [True] * 4 and all(proc.exitcode == 0 for proc in procs)
    names = _entries(tmp_path / "cache")
    assert len(names) == 1 and names[0].startswith("advisor-") and names[0].endswith(".pkl")
    again, hit = advisor_cache.cached_fit(logs)
    assert hit and isinstance(again, Advisor)
