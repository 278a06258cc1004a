"""`disttrain bench snapshot --peers` and `disttrain bench resume --peers` (issue 23)
run on a tiny state: every peer gives rows or is reported as skipped, and the
kill-during-save test's classification of what a resumed job loads. No timing asserts."""

import csv
import os

import pytest

from disttrain.bench import resume, snapshot_peers
from disttrain.bench import snapshot as snapshot_bench


@pytest.fixture(autouse=True)
def _no_rerun(monkeypatch):
    # The benches re-run themselves under the benchmark venv's Python for a missing peer; not in a test.
    monkeypatch.setenv("DISTTRAIN_BENCH_RERUN", "1")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_snapshot_peers_rows_or_skipped(tmp_path, capsys):
    out = tmp_path / "peers.csv"
    assert snapshot_bench.main(["snapshot", "--peers", "dcp,torchsnapshot", "--sizes-mb", "1", "--repeats", "1",
                                "--kill-mb", "0", "--min-free-gb", "0.1", "--dir", str(tmp_path),
                                "--peers-csv", str(out)]) == 0
    printed = capsys.readouterr().out
    systems = {r["system"] for r in _rows(out)}
    assert {"disttrain", "dcp"} <= systems
    assert "torchsnapshot" in systems or "# peer torchsnapshot skipped:" in printed
    for row in _rows(out):
        assert float(row["seconds"]) > 0
        assert row["operation"] in ("save", "load", "async blocked", "async total")


def test_kill_outcomes_are_classified(tmp_path):
    # What the kill test leaves behind, without the child process: a good step 1, a torn step 2.
    nbytes = 8 << 20
    ours = snapshot_peers.SYSTEMS["disttrain"](str(tmp_path / "ours"))
    os.makedirs(ours.folder, exist_ok=True)
    ours.save(snapshot_peers._kill_state(nbytes, 1.0), 1)
    with open(os.path.join(ours.folder, ".step_000000002.dts.tmp.1.1"), "wb") as f:
        f.write(b"\0" * 4096)
    assert snapshot_peers._outcome(ours, "one per step", nbytes) == "previous"
    dcp = snapshot_peers.SYSTEMS["dcp"](str(tmp_path / "dcp"))
    dcp.save(snapshot_peers._kill_state(nbytes, 1.0), 1)
    os.makedirs(dcp.target(2))
    with open(os.path.join(dcp.target(2), "__0_0.distcp"), "wb") as f:
        f.write(b"\0" * 4096)  # the data written so far; .metadata comes last
    assert snapshot_peers._outcome(dcp, "one per step", nbytes).startswith("error: ")
    assert snapshot_peers._outcome(dcp, "same path", nbytes) == "previous"


def test_resume_order_exact_and_torchdata_rows_or_skipped(tmp_path, capsys):
    out = tmp_path / "resume.csv"
    assert resume.main(["resume", "--peers", "torchdata", "--samples", "300", "--batch-size", "16",
                        "--workers", "0", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["loader"]: r for r in _rows(out)}
    assert rows["disttrain"]["order"] == "exact" and rows["disttrain-stream"]["order"] == "exact"
    assert "torchdata" in rows or "# peer torchdata skipped:" in printed


def test_results_file_is_replaced_atomically(tmp_path, monkeypatch):
    from disttrain.bench import write_csv

    path = str(tmp_path / "results" / "bench.csv")
    write_csv([{"size": 1, "us": 2.0}, {"size": 2, "us": 3.0}], path)
    before = open(path).read()
    umask = os.umask(0o022)
    os.umask(umask)
    assert before.splitlines()[0] == "size,us" and os.stat(path).st_mode & 0o777 == 0o666 & ~umask

    def interrupted(self, rows):  # the run stopped while the new results were being written
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_csv([{"size": 4, "us": 5.0}], path)
    assert open(path).read() == before  # was truncated to nothing but the header
    assert os.listdir(tmp_path / "results") == ["bench.csv"]  # no temporary left behind
