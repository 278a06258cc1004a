"""docs/advisor_results.md is generated from benchmarks/results/advisor_evaluation.csv
(python -m disttrain.advisor.results_page): the committed page must equal the
generated one, so the page and the CSV cannot drift apart."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disttrain.advisor import results_page
from harness import package_pythonpath

REPO = Path(__file__).resolve().parents[1]
CSV = REPO / results_page.CSV_PATH
PAGE = REPO / results_page.PAGE_PATH


def test_committed_page_equals_the_generated_one():
    assert PAGE.read_text() == results_page.render(CSV), (
        "docs/advisor_results.md is stale: run `python -m disttrain.advisor.results_page` from the repository root")


def test_page_reads_every_number_from_the_csv(tmp_path):
    rows = list(csv.DictReader(open(CSV)))
    page = results_page.render(CSV)
    config = next(r for r in rows if r["split"] == "config" and r["method"] == "advisor")
    assert f"| config | advisor | {float(config['time_mae_s']):.2f} | {float(config['time_mape_pct']):.1f} |" in page
    # Change one number: the page changes, and --check reports the committed page as stale.
    config["time_mape_pct"] = "12.5"
    changed = tmp_path / "evaluation.csv"
    with open(changed, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    new_page = results_page.render(changed)
    assert new_page != page
    assert f"| config | advisor | {float(config['time_mae_s']):.2f} | 12.5 |" in new_page
    assert "MAPE 12.5% (goal below 10%: **not met**" in new_page
    assert results_page.main(["--csv", str(changed), "--out", str(PAGE), "--check"]) == 1
    assert results_page.main(["--csv", str(CSV), "--out", str(PAGE), "--check"]) == 0
    out = tmp_path / "page.md"
    assert results_page.main(["--csv", str(changed), "--out", str(out)]) == 0 and out.read_text() == new_page


def test_missing_column_is_an_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("split,method\nrun,advisor\nrun,baseline\n")
    with pytest.raises(ValueError, match="missing column"):
        results_page.render(bad)


def test_sign_test():
    assert results_page.sign_test_p(64, 46) == pytest.approx(0.1046, abs=1e-4)
    assert results_page.sign_test_p(46, 64) == results_page.sign_test_p(64, 46)
    assert results_page.sign_test_p(5, 5) == 1.0 and results_page.sign_test_p(0, 0) == 1.0
    assert results_page.sign_test_p(10, 0) == pytest.approx(2 / 2 ** 10)


def test_command_runs_from_the_repository_root():
    env = dict(os.environ, PYTHONPATH=package_pythonpath())  # the same disttrain as this test
    out = subprocess.run([sys.executable, "-m", "disttrain.advisor.results_page", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
