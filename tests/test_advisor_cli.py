"""``disttrain advise`` as a user runs it: output, JSON, exit codes, no tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

import disttrain

REPO = Path(__file__).resolve().parents[1]
# The command runs the same disttrain as this test: installed, or the checkout's python/.
PACKAGE_PARENT = str(Path(disttrain.__file__).resolve().parents[1])


def advise(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "disttrain", "advise", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=300)


def test_ranked_table_and_json():
    out = advise("--model", "resnet50", "--target-acc", "0.75", "--gpus", "P40", "Tesla V100-SXM2-16GB", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rows = result["configurations"]
    assert rows and {r["gpu"] for r in rows} <= {"P40", "V100-SXM2"}
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(a["cost"] <= b["cost"] for a, b in zip(rows, rows[1:]))
    text = advise("--model", "resnet50", "--target-acc", "0.75", "--top", "3")
    assert text.returncode == 0 and text.stdout.startswith("cheapest:")
    assert len(text.stdout.strip().splitlines()) == 1 + 1 + 3  # message, header, 3 rows


def test_user_prices_and_deadline(tmp_path):
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu,price_per_gpu_hour\nTesla P40,5.0\nV100-SXM2,0.5\n")
    out = advise("--model", "resnet18", "--target-acc", "0.7", "--prices", str(prices), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["configurations"][0]["gpu"] == "V100-SXM2"
    late = advise("--model", "resnet18", "--target-acc", "0.7", "--deadline-hours", "0.001")
    assert late.returncode == 1 and "deadline" in late.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    malformed = tmp_path / "prices.csv"
    malformed.write_text("gpu,price_per_gpu_hour\nP40,cheap\n")
    bad_csv = tmp_path / "logs.csv"
    bad_csv.write_text("a,b\n1,2\n")
    cases = [("--model", "vgg11", "--target-acc", "0.7"),
             ("--model", "resnet50", "--target-acc", "0.7", "--gpus", "H100"),
             ("--model", "resnet50", "--target-acc", "0.97"),
             ("--model", "resnet50", "--target-acc", "0.7", "--prices", str(malformed)),
             ("--model", "resnet50", "--target-acc", "0.7", "--prices", str(tmp_path / "missing.csv")),
             ("--model", "resnet50", "--target-acc", "0.7", "--data", str(bad_csv))]
    for args in cases:
        out = advise(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("disttrain advise: "), out.stderr


def test_evaluate_writes_the_tables(tmp_path):
    # A small slice of the logs keeps this quick: two models, every GPU family.
    from disttrain.advisor.loading import default_data_path
    logs = default_data_path()
    subset = tmp_path / "logs"
    subset.mkdir()
    for csv in logs.rglob("*.csv"):
        if csv.name.startswith(("resnet18_", "resnet34_")):
            (subset / csv.name).write_bytes(csv.read_bytes())
    out = advise("--evaluate", "--data", str(subset), "--no-default-logs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "benchmarks" / "results" / "advisor_evaluation.csv")
    assert set(table["split"]) == {"run", "config", "gpu_family", "model"}
    assert set(table["method"]) == {"advisor", "baseline"}
    assert table["time_mape_pct"].notna().all() and (table["time_mape_pct"] > 0).all()
    # The paired count: per split, cases where either is strictly closer, never more than all cases.
    closer = table.groupby("split").agg(closer=("epochs_to_target_closer", "sum"), cases=("epochs_to_target_cases", "first"))
    assert (closer["closer"] <= closer["cases"]).all() and (closer["cases"] > 0).all()
    assert "leave" not in out.stderr and "time per epoch" in out.stdout
    assert all(f"split {split}:" in out.stderr for split in ("run", "config", "gpu_family", "model")), out.stderr
