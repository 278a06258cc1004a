"""Which epoch logs the advisor trains on: the logs shipped in the package by
default, ``DISTTRAIN_EPOCH_LOGS`` replaces them, ``--data`` adds to them,
``--no-default-logs`` leaves them out. No model is fitted here."""

import filecmp
import json
from pathlib import Path

import pandas as pd
import pytest

from disttrain.advisor import AdvisorInputError, data_sources, default_data_path
from disttrain.advisor import cli as advise_cli
from disttrain.advisor.loading import ENV_VAR, SHIPPED_LOGS, load_raw

REPO = Path(__file__).resolve().parents[1]
SHARED_LOGS = REPO.parent / "shared" / "data" / "epoch-logs"


def _trainer_csv(path: Path, model="resnet18", gpu="Tesla P40", epochs=3) -> Path:
    pd.DataFrame({"epoch": range(epochs), "epoch_timings": 10.0, "test_acc": 0.5, "model_name": model, "gpu": gpu,
                  "batch_size": 64}).to_csv(path, index=False)
    return path


def _sources(frame: pd.DataFrame) -> set[str]:
    return set(frame["source"])


def test_shipped_logs_are_complete_with_licence_and_origin():
    assert SHIPPED_LOGS.is_dir() and SHIPPED_LOGS.parent.name == "advisor"
    assert len(list((SHIPPED_LOGS / "runs").glob("*.csv"))) == 126
    assert "Apache License" in (SHIPPED_LOGS / "LICENSE").read_text()
    assert "sukumarh/distributed-training" in (SHIPPED_LOGS / "ORIGIN.md").read_text()
    assert len(json.loads((SHIPPED_LOGS / "configurations.json").read_text())) == 72


@pytest.mark.skipif(not SHARED_LOGS.is_dir(), reason="no shared/data/epoch-logs beside the repository")
def test_shipped_logs_equal_the_shared_data():
    # The package's copy must not drift from the project's data.
    files = sorted(p.relative_to(SHARED_LOGS) for p in SHARED_LOGS.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(SHARED_LOGS, SHIPPED_LOGS, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == len(files) == 129
    shipped = sorted(p.relative_to(SHIPPED_LOGS) for p in SHIPPED_LOGS.rglob("*") if p.is_file())
    assert sorted(set(shipped) - set(files)) == [Path("ORIGIN.md")]


def test_default_is_the_shipped_logs_and_the_variable_replaces_them(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_data_path() == SHIPPED_LOGS
    assert data_sources() == [SHIPPED_LOGS]
    mine = tmp_path / "mine"
    mine.mkdir()
    _trainer_csv(mine / "a.csv")
    monkeypatch.setenv(ENV_VAR, str(mine))
    assert default_data_path() == mine
    raw = load_raw(data_sources())
    assert _sources(raw) == {str((mine / "a.csv").resolve())} and len(raw) == 3  # the shipped logs are gone
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(AdvisorInputError, match=ENV_VAR):
        data_sources()


def test_data_adds_to_the_defaults_and_no_default_logs_replaces(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    extra = _trainer_csv(tmp_path / "extra.csv", model="resnet34")
    shipped = load_raw(data_sources())
    added = load_raw(data_sources([extra]))
    assert len(added) == len(shipped) + 3
    assert _sources(added) == _sources(shipped) | {str(extra.resolve())}
    # A path the defaults already hold is read once, not twice.
    assert len(load_raw(data_sources([SHIPPED_LOGS, SHIPPED_LOGS / "runs"]))) == len(shipped)
    only = load_raw(data_sources([extra], default_logs=False))
    assert _sources(only) == {str(extra.resolve())} and len(only) == 3
    with pytest.raises(AdvisorInputError, match="--no-default-logs needs --data"):
        data_sources(None, default_logs=False)


def test_the_command_line_follows_the_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    extra = _trainer_csv(tmp_path / "extra.csv")

    def sources(*argv):
        return advise_cli._sources(advise_cli._parser().parse_args(["--model", "resnet50", "--target-acc", "0.8", *argv]))

    assert sources() == [SHIPPED_LOGS]
    assert sources("--data", str(extra)) == [SHIPPED_LOGS, extra]
    assert sources("--data", str(extra), "--no-default-logs") == [extra]
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert sources("--data", str(extra)) == [tmp_path, extra]


def test_command_line_errors_about_the_logs_are_one_line(tmp_path, monkeypatch, capsys):
    # In process (no fit happens): the same one-line, status-2 contract as the other bad input.
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert advise_cli.main(["--model", "resnet50", "--target-acc", "0.7", "--no-default-logs"]) == 2
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    assert advise_cli.main(["--model", "resnet50", "--target-acc", "0.7"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 2
    assert lines[0] == "disttrain advise: no epoch logs: --no-default-logs needs --data PATH [PATH ...]"
    assert lines[1].startswith("disttrain advise: DISTTRAIN_EPOCH_LOGS=") and "no such file" in lines[1]


def test_a_file_rewritten_in_place_is_read_again(tmp_path):
    # load_raw keeps what it parsed, by the file's bytes: a file rewritten between two loads (same
    # size, within one tick of the file system's clock) must give its new rows, and a copy of the
    # rows handed out must not change what the next load gives.
    path = _trainer_csv(tmp_path / "run.csv")
    first = load_raw([path])
    first["epoch_timings"] = -1.0  # the caller's copy
    assert (load_raw([path])["epoch_timings"] == 10.0).all()
    path.write_text(path.read_text().replace("10.0", "20.0"))
    assert (load_raw([path])["epoch_timings"] == 20.0).all()
    same = tmp_path / "copy.csv"
    same.write_bytes(path.read_bytes())  # the same bytes elsewhere: each row names its own file
    assert _sources(load_raw([path, same])) == {str(path.resolve()), str(same.resolve())}


def test_device_names_read_as_families():
    """The logs' board names fold into their chip's family; a name outside the table is a family
    of its own, without a data sheet (test_advisor_trainer_runs.py: its runs teach it); a Quadro
    P4000 or P1000 is not a P40 or a P100 (their patterns matched inside those names)."""
    from disttrain.advisor.hardware import device_family, gpu_family, has_data_sheet

    assert [gpu_family(n) for n in ("Tesla P40", "Tesla P100-PCIE-16GB", "Tesla V100-SXM2-32GB-LS", "cpu")] == [
        "P40", "P100", "V100-SXM2", "CPU"]
    assert gpu_family("Quadro P4000") is None and gpu_family("Quadro P1000") is None
    assert device_family(" NVIDIA H200 ") == "NVIDIA H200" and device_family("Quadro P4000") == "Quadro P4000"
    assert device_family("") is None and device_family(float("nan")) is None
    assert has_data_sheet("A100") and not has_data_sheet("CPU") and not has_data_sheet("NVIDIA H200")
