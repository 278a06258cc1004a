"""``disttrain advise`` as a user runs it: output, JSON, exit codes, no tracebacks.

One case runs as a real process (``python -m disttrain advise``: the dispatch, the exit status,
nothing but one line on stderr), started with the module and read at its end; the others run
``main()`` in this process, which is the same code after the dispatch, without paying for another
interpreter and torch import each. The fit itself comes from the session's fit cache
(tests/conftest.py), so it is made once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import background
from harness import package_pythonpath
from disttrain.advisor import cli as advise_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def started_with_the_module(request):
    """Real processes that the tests to run read later, started at this module's start: they use
    one core while this module's tests, run in this process, use the other. test_advisor_wheel.py's
    fresh install (conftest's ``fresh_install``), and this module's unknown-model process."""
    for fixture in ("fresh_install", "unknown_model_process"):
        background.start_if_read(request, fixture)


@pytest.fixture(scope="module")
def unknown_model_process():
    """``disttrain advise --model vgg11 ...`` as a real process, started when the module starts and
    read by the test at its end (the interpreter's start and torch's import, seconds of one core,
    overlap this module's other tests)."""
    env = dict(os.environ, PYTHONPATH=package_pythonpath())  # the same disttrain as this test
    proc = subprocess.Popen([sys.executable, "-m", "disttrain", "advise", *UNKNOWN_MODEL[0]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


UNKNOWN_MODEL = (("--model", "vgg11", "--target-acc", "0.7"), "unknown model 'vgg11'")


def advise_here(capsys, *args):
    """``disttrain advise ARGS`` in this process: (exit status, stdout, stderr). An exception
    that escapes main() (a traceback, for a user) fails the test."""
    capsys.readouterr()
    code = advise_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ranked_table_and_json(capsys):
    # In this process (the command's real process prints JSON in test_advisor_wheel.py's fresh venv).
    code, stdout, stderr = advise_here(capsys, "--model", "resnet50", "--target-acc", "0.75", "--gpus", "P40",
                                       "Tesla V100-SXM2-16GB", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    rows = result["configurations"]
    assert rows and {r["gpu"] for r in rows} <= {"P40", "V100-SXM2"}
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(a["cost"] <= b["cost"] for a, b in zip(rows, rows[1:]))
    # Units for every number; no infinity: an unbounded end is null, and whether the target is
    # reached with 80% confidence is said outright (and agrees with that end being bounded).
    assert "Infinity" not in stdout
    assert result["units"]["cost"] == "USD" and result["units"]["epoch_time_s"] == "s" and result["units"]["hours"] == "h"
    assert all(isinstance(r["reached_80pct"], bool) and 0 <= r["p_reach"] <= 1 for r in rows)
    assert all(r["reached_80pct"] == (r["epochs_high"] is not None) == (r["cost_high"] is not None) for r in rows)
    assert all(r["reached_80pct"] == (r["p_reach"] >= 0.8) for r in rows)
    code, stdout, _ = advise_here(capsys, "--model", "resnet50", "--target-acc", "0.75", "--top", "3")
    assert code == 0 and stdout.startswith("cheapest:")
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 + 1 + 3 + 1  # message, header, 3 rows, what the columns mean
    header = lines[1].split()
    assert header[:4] == ["rank", "gpu", "num_of_gpus", "batch_per_gpu"] and "cost_USD" in header
    assert "reached_with_80pct_confidence" in header and "data_split_across_gpus" in header
    assert "inf" not in stdout and "80% confidence" in lines[0]


def test_user_prices_and_deadline(tmp_path, capsys):
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu,price_per_gpu_hour\nTesla P40,5.0\nV100-SXM2,0.5\n")
    code, stdout, stderr = advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7", "--prices", str(prices), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["configurations"][0]["gpu"] == "V100-SXM2"
    assert result["units"]["cost"] == "price units"  # the price file's currency, not USD
    # Out of reach within the deadline: status 1 (main's return value is the process's status,
    # as the real processes of the other tests show for 0 and 2), the reason on stdout.
    code, stdout, stderr = advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7", "--deadline-hours", "0.001")
    assert code == 1 and "deadline" in stdout and not stderr.strip()
    # An infinite deadline is none (it was refused as not a positive number).
    code, unbounded, stderr = advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7", "--deadline-hours", "inf")
    assert code == 0, stderr
    assert unbounded == advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7")[1]


def _one_line(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("disttrain advise: ")


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    malformed = tmp_path / "prices.csv"
    malformed.write_text("gpu,price_per_gpu_hour\nP40,cheap\n")
    bad_csv = tmp_path / "logs.csv"
    bad_csv.write_text("a,b\n1,2\n")
    ragged, huge, typo = tmp_path / "ragged.csv", tmp_path / "huge.csv", tmp_path / "typo.csv"
    ragged.write_text("gpu,price_per_gpu_hour\nP100,2\nP40,1,5\n")
    huge.write_text("gpu,price_per_gpu_hour\nP40,1e308\n")
    typo.write_text("gpu,price_per_gpu_hour\nP4O,1\n")
    (tmp_path / "empty").mkdir()
    # Each case with a word its one line must hold, so a case that fails for another reason fails the test.
    cases = [UNKNOWN_MODEL,
             (("--model", "resnet50", "--target-acc", "0.7", "--gpus", "H100"), "no epoch logs for GPU 'H100'"),
             (("--model", "resnet50", "--target-acc", "0.97"), "best accuracy"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(malformed)), "'cheap' is not a positive number"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(tmp_path / "missing.csv")), "cannot read price file"),
             (("--model", "resnet50", "--target-acc", "0.7", "--data", str(bad_csv)), "logs.csv: lacks column(s)"),
             # Beside the default logs, a folder without CSV files added nothing, in silence.
             (("--model", "resnet50", "--target-acc", "0.7", "--data", str(tmp_path / "empty")), "no CSV files under"),
             (("--evaluate", "--max-folds", "1"), "--max-folds 1"),
             (("--serve", "--port", "99999"), "--port 99999"),  # was a traceback (OverflowError from bind)
             # These three printed argparse's whole usage, or were taken (a deadline of -1 h, --top 0).
             (("--model", "resnet50", "--target-acc", "abc"), "invalid float value: 'abc'"),
             (("--model", "resnet50", "--target-acc", "0.7", "--deadline-hours", "-1"), "--deadline-hours -1.0"),
             (("--model", "resnet50", "--target-acc", "0.7", "--deadline-hours", "nan"), "--deadline-hours nan"),
             (("--model", "resnet50", "--target-acc", "0.7", "--top", "0"), "--top 0"),
             # Two modes, or an option of another mode, were taken with one of them silently ignored
             # (--serve --calibrate served and never calibrated; --port 99999 ranked, exit 0).
             (("--serve", "--calibrate"), "--serve and --calibrate: give one of"),
             (("--predict", "x.csv", "--model", "resnet50"), "--predict and --model/--target-acc: give one of"),
             (("--evaluate", "--prices", str(malformed)), "--prices belongs to --model/--target-acc, not to --evaluate"),
             (("--model", "resnet50", "--target-acc", "0.7", "--port", "99999"), "--port belongs to --serve"),
             (("--model", "resnet50", "--target-acc", "0.7", "--max-folds", "1"), "--max-folds belongs to --evaluate"),
             (("--device", "cpu"), "--device belongs to --calibrate, not to a recommendation"),
             # A price file's extra field ('P40,1,5': which is the price?) was dropped; a price of 1e308
             # made every cost inf; a file pricing only a typo did not name it.
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(ragged)), "line 3: more fields than the header's"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(huge)), "'1e308' is not a positive number up to 1e+12"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(typo)), "no GPU type has both epoch logs and a price ('P4O' is priced but has no runs and no data sheet")]
    # The first case also runs as a real process (test_a_real_process_exits_2_with_one_line, at the end).
    for args, words in cases:
        code, stdout, stderr = advise_here(capsys, *args)
        assert code == 2 and _one_line(stderr) and words in stderr, (args, code, stdout, stderr)


def test_evaluate_writes_the_tables(tmp_path, capsys, monkeypatch):
    # A small slice of the logs keeps this quick: the single-GPU runs (MODEL_GPU_CONFIG.csv) of two
    # models, 16 runs on three GPU families.
    from disttrain.advisor.loading import default_data_path
    logs = default_data_path()
    subset = tmp_path / "logs"
    subset.mkdir()
    for csv in logs.rglob("*.csv"):
        if csv.name.startswith(("resnet18_", "resnet34_")) and len(csv.stem.split("_")) == 4:
            (subset / csv.name).write_bytes(csv.read_bytes())
    assert len(list(subset.glob("*.csv"))) == 16
    # At most 2 folds per split (the quick path; every split and both methods still run, grouped).
    # main() in this process, from tmp_path (the command's real process is tested above).
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = advise_here(capsys, "--evaluate", "--max-folds", "2", "--data", str(subset),
                                       "--no-default-logs")
    assert code == 0, stderr
    # A capped run writes its own CSV, never the committed evaluation's.
    assert not (tmp_path / "benchmarks" / "results" / "advisor_evaluation.csv").exists()
    table = pd.read_csv(tmp_path / "benchmarks" / "results" / "advisor_evaluation_quick.csv")
    # The subset holds 3 of the frozen holdout's configurations: the cross-validated splits run without
    # them, the holdout split scores them once.
    assert set(table["split"]) == {"run", "config", "gpu_family", "model", "holdout"}
    holdout = table[table["split"] == "holdout"].iloc[0]
    assert holdout["time_runs"] == 6 and table[table["split"] == "config"]["time_runs"].iloc[0] == 10
    assert 0 <= holdout["time_interval_run_coverage_pct"] <= 100 and holdout["time_worst_run_ape_pct"] > 0
    assert set(table["method"]) == {"advisor", "baseline"}
    assert table["time_mape_pct"].notna().all() and (table["time_mape_pct"] > 0).all()
    # The paired count: per split, cases where either is strictly closer, never more than all cases.
    closer = table.groupby("split").agg(closer=("epochs_to_target_closer", "sum"), cases=("epochs_to_target_cases", "first"))
    assert (closer["closer"] <= closer["cases"]).all() and (closer["cases"] > 0).all()
    assert "leave" not in stderr and "time per epoch" in stdout
    # Two folds per split (the 3 GPU families dealt into 2; the 2 models one at a time, as uncapped).
    for split, folds in (("run", 2), ("config", 2), ("gpu_family", 2), ("model", 2), ("holdout", 1)):
        assert f"split {split}: {folds} folds done" in stderr, stderr


def test_more_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    # Each was taken, or a traceback: a header-only or unmeasurable --predict CSV printed pandas'
    # "Empty DataFrame" or a measured epoch of -1 s; a batch of 1.5, a GPU count of 1e30 (a NaN
    # prediction), -3 loader workers and a malformed learning rate were predicted; a price file
    # pricing one family twice kept the last line, an infinite price gave infinite costs; a junk
    # CSV among the --data files was reported as rows with a missing batch size.
    metrics = ("epoch,epoch_timings,model_name,gpu,batch_size,num_of_gpus,num_workers_data_loader,learning_rate,dataset,"
               "is_distributed\n0,{t},resnet18,{gpu},{b},{g},{w},{lr},cifar10,{d}\n")
    ok = dict(t="30.0", b="128", g="1", w="4", lr="0.1", gpu="Tesla P40", d="False")

    def csv(name, **change):
        path = tmp_path / f"{name}.csv"
        path.write_text(metrics.format(**{**ok, **change}))
        return str(path)
    header = tmp_path / "header.csv"
    header.write_text(metrics.splitlines()[0] + "\n")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "junk.csv").write_text("x,y\n1,2\n")
    prices_dup = tmp_path / "prices_dup.csv"
    prices_dup.write_text("gpu,price_per_gpu_hour\nP40,1\nTesla P40,2\n")
    prices_inf = tmp_path / "prices_inf.csv"
    prices_inf.write_text("gpu,price_per_gpu_hour\nP40,inf\n")
    cases = [(("--predict", str(header)), "no rows"),
             (("--predict", csv("neg", t="-1")), "epoch_timings '-1' is not a positive number"),
             (("--predict", csv("inf", t="inf")), "epoch_timings 'inf' is not a positive number"),
             (("--predict", csv("half", b="1.5")), "batch_size 1.5: give a whole number"),
             (("--predict", csv("many", g="1e30")), "num_of_gpus 1e+30: give a whole number"),
             (("--predict", csv("workers", w="-3")), "num_workers_data_loader -3: give a whole number"),
             (("--predict", csv("lr", lr="fast")), "learning_rate 'fast' is not a positive number"),
             # Read as false, and on a device calibrated here (the CPU) not checked at all.
             (("--predict", csv("dist", d="maybe")), "is_distributed 'maybe' is not true or false"),
             (("--predict", csv("cpu_lr", lr="fast", gpu="cpu")), "learning_rate 'fast' is not a positive number"),
             (("--predict", csv("cpu_dist", d="maybe", gpu="cpu")), "is_distributed 'maybe' is not true or false"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(prices_dup)), "already priced on line 2"),
             (("--model", "resnet50", "--target-acc", "0.7", "--prices", str(prices_inf)), "'inf' is not a positive number"),
             (("--model", "resnet50", "--target-acc", "0.7", "--data", str(junk)),
              "junk.csv: lacks column(s) epoch_timings, model_name, gpu, batch_size (have: x, y)")]
    for args, words in cases:
        code, stdout, stderr = advise_here(capsys, *args)
        assert code == 2 and _one_line(stderr) and words in stderr, (args, code, stdout, stderr)
    # A good CSV still predicts; a GPU named twice is one candidate, not two equal rows.
    code, stdout, stderr = advise_here(capsys, "--predict", csv("good"), "--json")
    assert code == 0 and json.loads(stdout)["configurations"][0]["measured_s"] == 30.0, stderr
    code, stdout, stderr = advise_here(capsys, "--model", "resnet50", "--target-acc", "0.7", "--gpus", "P40",
                                       "Tesla P40", "--json")
    rows = json.loads(stdout)["configurations"]
    assert code == 0 and len(rows) == len({(r["num_of_gpus"], r["batch_size"], r["distribute_data"]) for r in rows})


def test_a_damaged_calibration_file_is_ignored(tmp_path, capsys):
    # A calibration JSON whose top level loads but whose timings are junk was a traceback
    # (TypeError, KeyError) in --predict; it is now ignored, as a file that is not JSON was.
    from disttrain.advisor import calibrate

    path = calibrate._path("cpu")
    kept = path.read_bytes() if path.exists() else None
    run = tmp_path / "metrics.csv"
    run.write_text("epoch,epoch_timings,model_name,num_of_paramters,gpu,batch_size,dataset\n0,0.5,small_cnn,6090,cpu,128,digits\n")
    head = '{"device": "cpu", "host": "h", "threads": 1, "version": %d, "timings": ' % calibrate.VERSION
    timing = ('{"model_name": "small_cnn", "dataset": "digits", "batch_size": 128, "workers": 0, "epoch_s": %s, '
              '"timed_batches": 11, "step_s": 0.04, "step_s_sd": 0.01}')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for junk in ('"junk"}', 'null}', '[1, 2]}', '[{"model_name": "small_cnn"}]}', '{"a": 1}}',
                     "[" + timing % "-7" + "]}", "[" + timing % '"x"' + "]}"):
            path.write_text(head + junk)
            assert calibrate.load("cpu") is None, junk
            # No calibration: the fitted model, which has no CPU runs: one line, status 2.
            code, stdout, stderr = advise_here(capsys, "--predict", str(run))
            assert code == 2 and _one_line(stderr) and "no epoch logs for GPU CPU" in stderr, (junk, stderr)
        path.write_text(head + "[" + timing % "0.5" + "]}")
        assert calibrate.load("cpu").timings[0]["epoch_s"] == 0.5
    finally:
        if kept is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(kept)


def test_a_calibrated_device_checks_its_configurations(tmp_path, capsys):
    # A configuration of a device calibrated here skipped the fitted model's checks: a batch of
    # 0, -5 or 'abc' was a traceback from the measurement, 128.5 or 1.5 GPUs were read as 128 or 1.
    from disttrain.advisor import calibrate

    path = calibrate._path("cpu")
    kept = path.read_bytes() if path.exists() else None
    timing = {"model_name": "small_cnn", "dataset": "digits", "batch_size": 128, "workers": 0, "processes": 1,
              "epoch_s": 0.5, "timed_batches": 11, "step_s": 0.04, "step_s_sd": 0.01}
    header = "epoch,epoch_timings,model_name,gpu,batch_size,num_of_gpus,num_workers_data_loader,num_of_nodes,dataset\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": "cpu", "host": "h", "threads": 1, "version": calibrate.VERSION,
                                    "timings": [timing]}))
        cases = [("0,1,0,1", "batch_size 0:"), ("-5,1,0,1", "batch_size -5:"), ("abc,1,0,1", "batch_size abc:"),
                 ("128.5,1,0,1", "batch_size 128.5:"), ("128,1.5,0,1", "num_of_gpus 1.5:"),
                 ("128,1,0.5,1", "num_workers_data_loader 0.5:"), ("128,1,0,x", "num_of_nodes x:")]
        for i, (values, words) in enumerate(cases):
            run = tmp_path / f"run{i}.csv"
            run.write_text(header + f"0,0.6,small_cnn,cpu,{values},digits\n")
            code, stdout, stderr = advise_here(capsys, "--predict", str(run))
            assert code == 2 and _one_line(stderr) and words in stderr, (values, code, stdout, stderr)
        run = tmp_path / "good.csv"
        run.write_text(header + "0,0.6,small_cnn,cpu,128,1,0,1,digits\n")
        code, stdout, stderr = advise_here(capsys, "--predict", str(run), "--json")
        assert code == 0 and json.loads(stdout)["configurations"][0]["epoch_time_s"] == 0.5, stderr
    finally:
        if kept is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(kept)


def test_calibrate_names_an_unusable_cache_folder(tmp_path, capsys, monkeypatch):
    # A $DISTTRAIN_ADVISOR_CACHE that is a file, or a folder others can write, was reported as
    # "the advisor's cache is off" after the measurement, and --predict then asked for --calibrate.
    from disttrain.advisor import calibrate

    measured = calibrate.Calibration(device="cpu", host="h", threads=1, timings=[])
    monkeypatch.setattr(calibrate, "calibrate", lambda *args, **kwargs: measured)
    monkeypatch.setattr(advise_cli, "_speed_scale", lambda args: None)
    (tmp_path / "a_file").write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    for folder in (tmp_path / "a_file", shared):
        monkeypatch.setenv("DISTTRAIN_ADVISOR_CACHE", str(folder))
        code, stdout, stderr = advise_here(capsys, "--calibrate", "--device", "cpu")
        assert code == 0 and "not stored" in stdout and "is off" not in stdout and str(folder) in stdout, stdout
    monkeypatch.setenv("DISTTRAIN_ADVISOR_CACHE", "off")
    code, stdout, stderr = advise_here(capsys, "--calibrate", "--device", "cpu")
    assert code == 0 and "cache is off" in stdout, stdout
    monkeypatch.setenv("DISTTRAIN_ADVISOR_CACHE", str(tmp_path / "mine"))
    code, stdout, stderr = advise_here(capsys, "--calibrate", "--device", "cpu")
    assert code == 0 and f"stored: {tmp_path / 'mine'}" in stdout, stdout


def test_a_priced_type_that_is_not_ranked_is_named(tmp_path, capsys):
    # A typo ('P1OO': a device of its own, without runs) and a data-sheet family without runs (A100,
    # ranked only when named in --gpus) were dropped from the ranking in silence.
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu,price_per_gpu_hour\nP40,1\nP1OO,0.01\nA100,2\nV100-SMX2,3\nTesla P100-PCIE-16GB,2\n")
    code, stdout, stderr = advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7", "--prices", str(prices))
    assert code == 0 and "cheapest: " in stdout, stderr
    # And a name read as a family it does not name (the typo 'V100-SMX2' matches V100: V100-PCIE).
    assert stderr.splitlines() == [
        f"disttrain advise: note: price file '{prices}' line 5: 'V100-SMX2' read as V100-PCIE (write the family's name to be sure)",
        "disttrain advise: note: 'P1OO' is priced but has no runs and no data sheet (a typo? give its runs with --data): not ranked",
        "disttrain advise: note: 'A100' is priced but has no runs: name it in gpus (--gpus A100) to rank it from its data sheet"]
    code, stdout, _ = advise_here(capsys, "--model", "resnet18", "--target-acc", "0.7", "--prices", str(prices), "--json")
    notes = json.loads(stdout)["notes"]
    assert code == 0 and [name in note for name, note in zip(("'V100-SMX2'", "'P1OO'", "'A100'"), notes)] == [True] * 3


def test_evaluate_that_cannot_write_its_csv_prints_the_tables_then_one_line(tmp_path, capsys, monkeypatch):
    # A file where benchmarks/ should be (or a read-only folder, a full disk) was a traceback after
    # the whole evaluation, its tables never printed.
    from disttrain.advisor import evaluation

    summary = pd.read_csv(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "advisor_evaluation.csv")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"summary": summary, "random_split": {
        "time_mae_s": 0.76, "accuracy_mae": 0.02}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").write_text("not a folder")
    for json_out, printed in (((), "time per epoch (out of fold"), (("--json",), '"time_mape_pct"')):
        code, stdout, stderr = advise_here(capsys, "--evaluate", "--max-folds", "2", *json_out)
        assert code == 1 and printed in stdout, (stdout, stderr)
        assert stderr.splitlines()[-1].startswith("disttrain advise: benchmarks/results/advisor_evaluation_quick.csv "
                                                   "not written: Not a directory"), stderr


def test_evaluate_json_has_no_nan(tmp_path, capsys, monkeypatch):
    # --evaluate --json printed the baseline's interval columns (no intervals: NaN) as bare NaN,
    # which is not JSON (json.loads in strict parsers, jq, JavaScript refuse it); -inf passed too.
    from disttrain.advisor import evaluation

    summary = pd.DataFrame([{"split": "run", "method": "baseline", "time_mape_pct": 9.5,
                             "time_interval_coverage_pct": float("nan"), "regret_median_pct": float("inf"),
                             "regret_mean_pct": float("-inf")}])
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"summary": summary, "random_split": {
        "time_mae_s": 0.76, "accuracy_mae": float("nan")}})
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = advise_here(capsys, "--evaluate", "--max-folds", "2", "--json")
    assert code == 0, stderr
    out = json.loads(stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    row = out["summary"][0]
    assert row["time_mape_pct"] == 9.5 and row["time_interval_coverage_pct"] is None
    assert row["regret_median_pct"] is None and row["regret_mean_pct"] is None
    assert out["random_split_baseline"] == {"time_mae_s": 0.76, "accuracy_mae": None}


def test_concurrent_predictions_keep_each_others_measurements(tmp_path, capsys, monkeypatch):
    # Two --predict processes that each measured a new configuration at the same time each stored
    # the file they had loaded plus their own measurement: the first one's was lost (seen with
    # batch 16 and 64 run side by side). A measurement stored meanwhile is now kept.
    from disttrain.advisor import calibrate

    monkeypatch.setenv("DISTTRAIN_ADVISOR_CACHE", str(tmp_path / "cache"))

    def timing(batch):
        return {"model_name": "small_cnn", "dataset": "digits", "batch_size": batch, "workers": 0, "processes": 1,
                "epoch_s": 0.5, "timed_batches": 11, "step_s": 0.04, "step_s_sd": 0.01}

    stored = calibrate.Calibration(device="cpu", host="h", threads=1, timings=[timing(128)], created=5.0,
                                   version=calibrate.VERSION)
    assert calibrate.store(stored) is not None

    def measure_while_another_stores(model, dataset, batch, workers, device, processes=1):
        other = calibrate.load("cpu")  # the other process, which loaded the file and measured batch 16
        other.timings.append(timing(16))
        calibrate.store(other)
        return timing(batch)

    monkeypatch.setattr(calibrate, "measure_steps", measure_while_another_stores)
    run = tmp_path / "metrics.csv"
    run.write_text("epoch,epoch_timings,model_name,num_of_paramters,gpu,batch_size,dataset\n0,0.5,small_cnn,6090,cpu,64,digits\n")
    code, stdout, stderr = advise_here(capsys, "--predict", str(run))
    assert code == 0, stderr
    assert sorted(t["batch_size"] for t in calibrate.load("cpu").timings) == [16, 64, 128]


def test_a_real_process_exits_2_with_one_line(unknown_model_process):
    # The first bad-input case as a real process (started with the module): its exit status and its
    # whole stderr, nothing printed by the interpreter or the imports.
    stdout, stderr = unknown_model_process.communicate(timeout=300)
    args, words = UNKNOWN_MODEL
    assert unknown_model_process.returncode == 2 and _one_line(stderr) and words in stderr, (args, stdout, stderr)
