"""Writes docs/advisor_results.md from the evaluation's CSV.

    python -m disttrain.advisor.results_page            # from the repository root
    python -m disttrain.advisor.results_page --check    # exit 1 when the page is stale

``disttrain advise --evaluate`` writes benchmarks/results/advisor_evaluation.csv;
this renders it as the results page, every number on it read from the CSV, so
the page and the CSV cannot disagree (tests/test_advisor_results.py checks the
committed page equals the rendered one). Standard library only: no pandas.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

CSV_PATH = Path("benchmarks") / "results" / "advisor_evaluation.csv"
PAGE_PATH = Path("docs") / "advisor_results.md"
SPLITS = {"run": "a run (GroupKFold(5) over runs)", "config": "a configuration (all its GPU types)",
          "gpu_family": "a GPU family", "model": "a model",
          "holdout": "the frozen development holdout (`advisor/holdout.json`: 9 configurations, 16 runs), "
                     "scored once, fitted on all other runs"}
GROUPED = ["config", "gpu_family", "model"]  # the splits where no part of a held-out configuration is seen
COLUMNS = ["split", "method", "time_mae_s", "time_mape_pct", "time_interval_coverage_pct", "time_interval_high_over_low",
           "epochs_to_target_median_err", "epochs_to_target_mean_err", "epochs_to_target_median_err_frac",
           "epochs_to_target_mean_err_frac", "epochs_to_target_closer", "epochs_to_target_cases", "accuracy_mae",
           "regret_median_pct", "regret_mean_pct", "regret_infeasible", "regret_cases",
           "time_worst_run_ape_pct", "time_runs", "time_interval_run_coverage_pct"]
GOAL_TIME_MAPE_PCT = 10.0     # leaving a configuration out
GOAL_COVERAGE_PCT = 80.0      # the intervals' nominal coverage
GOAL_EPOCHS_MEDIAN_ERR = 2.0  # leaving a configuration out
# Issue 21's goals, on the holdout and the grouped splits: time MAPE, the worst run, runs inside their interval.
GOAL_HOLDOUT_MAPE_PCT = 8.0
GOAL_WORST_RUN_PCT = 30.0
MUST_SHOW = ["config", "gpu_family", "model", "holdout"]
# The earlier time models, oldest first: time MAPE %, worst run %, runs inside their 80% interval %.
# Fixed figures, shown beside the current ones. First, the model before its communication rate got
# a correction per GPU family (commit 84f6f1a's evaluation CSV; the holdout's is its score taken
# right after the freeze); then the model with that correction, before communication overlapped
# the GPU work (commit 095a70b's evaluation CSV); then the model with that overlap, before runs on a
# slowed host were left out of the fit (commit bbbc50c's evaluation CSV); then the model with those
# runs left out, before every run was weighted alike (commit 0841921's evaluation CSV).
EARLIER_TIME_MODELS = [
    ("first", {"config": (12.6, 75.8, 86.7), "gpu_family": (24.0, 102.8, 88.9), "model": (18.9, 75.7, 97.8),
               "holdout": (8.9, 19.3, 93.8)}),
    ("per-family communication", {"config": (12.3, 75.8, 86.7), "gpu_family": (24.1, 102.8, 88.9),
                                  "model": (18.1, 75.7, 97.8), "holdout": (8.8, 19.4, 93.8)}),
    ("overlapped communication", {"config": (11.7, 75.8, 86.7), "gpu_family": (23.9, 101.1, 88.9),
                                  "model": (17.7, 75.7, 97.8), "holdout": (8.6, 19.6, 81.2)}),
    ("slowed hosts left out", {"config": (10.3, 75.8, 88.9), "gpu_family": (23.2, 78.2, 82.2),
                               "model": (17.7, 75.7, 97.8), "holdout": (8.3, 19.6, 81.2)}),
]


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, float | str]]:
    """(split, method) -> the row, numbers as floats (NaN for an empty cell).

    Raises:
        ValueError: a column the page needs is missing, or a split lacks a method.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = {}
        for row in reader:
            parsed = {k: (v if k in ("split", "method") else (float(v) if v.strip() else math.nan))
                      for k, v in row.items()}
            rows[(row["split"], row["method"])] = parsed
    for split in {s for s, _ in rows}:
        for method in ("advisor", "baseline"):
            if (split, method) not in rows:
                raise ValueError(f"{path}: split '{split}' has no '{method}' row")
    return rows


def _f(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _i(value: float) -> str:
    return "-" if math.isnan(value) else str(int(round(value)))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test, ties dropped."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _common(rows, column: str) -> str | None:
    values = {_i(r[column]) for r in rows.values()}
    return values.pop() if len(values) == 1 else None


def _table(rows, splits) -> list[str]:
    cases = _common(rows, "epochs_to_target_cases")
    regret_cases = _common(rows, "regret_cases")
    closer_head = f"strictly closer, of {cases}" if cases else "strictly closer / cases"
    regret_head = f"regret median / mean % (infeasible of {regret_cases})" if regret_cases else \
        "regret median / mean % (infeasible / cases)"
    lines = ["| split | method | time MAE s | time MAPE % | 80% interval coverage % (median high / low) "
             "| epochs-to-target median / mean err (fractional median / mean) | " + closer_head
             + " | accuracy MAE | " + regret_head + " |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split in splits:
        for method in ("advisor", "baseline"):
            r = rows[(split, method)]
            coverage = "-" if math.isnan(r["time_interval_coverage_pct"]) else \
                f"{_f(r['time_interval_coverage_pct'], 1)} ({_f(r['time_interval_high_over_low'], 2)})"
            epochs = (f"{_f(r['epochs_to_target_median_err'], 1)} / {_f(r['epochs_to_target_mean_err'], 2)} "
                      f"({_f(r['epochs_to_target_median_err_frac'], 2)} / {_f(r['epochs_to_target_mean_err_frac'], 2)})")
            closer = _i(r["epochs_to_target_closer"]) + ("" if cases else f" / {_i(r['epochs_to_target_cases'])}")
            infeasible = _i(r["regret_infeasible"]) + ("" if regret_cases else f" / {_i(r['regret_cases'])}")
            lines.append(f"| {split} | {method} | {_f(r['time_mae_s'], 2)} | {_f(r['time_mape_pct'], 1)} | {coverage} "
                         f"| {epochs} | {closer} | {_f(r['accuracy_mae'], 4)} "
                         f"| {_f(r['regret_median_pct'], 1)} / {_f(r['regret_mean_pct'], 1)} ({infeasible}) |")
    return lines


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _than(ours: float, theirs: float) -> str:
    """The advisor against the baseline on an error (lower is better)."""
    if ours == theirs:
        return "a tie"
    return "advisor better" if ours < theirs else "baseline better"


def _findings(rows, splits) -> list[str]:
    out = []
    if "config" in splits:
        a, b = rows[("config", "advisor")], rows[("config", "baseline")]
        out.append(f"- Time per epoch, leaving a configuration out: MAPE {_f(a['time_mape_pct'], 1)}% "
                   f"(goal below {GOAL_TIME_MAPE_PCT:.0f}%: {_met(a['time_mape_pct'] < GOAL_TIME_MAPE_PCT)}; "
                   f"baseline {_f(b['time_mape_pct'], 1)}%), MAE {_f(a['time_mae_s'], 2)} s "
                   f"(baseline {_f(b['time_mae_s'], 2)} s).")
    better = [s for s in splits if rows[(s, "advisor")]["time_mape_pct"] < rows[(s, "baseline")]["time_mape_pct"]]
    worse = [s for s in splits if s not in better]
    out.append(f"- Time MAPE against the baseline: lower on {', '.join(better) or 'no split'}"
               + (f"; not lower on {', '.join(worse)}." if worse else " (every split)."))
    coverage = [(s, rows[(s, "advisor")]["time_interval_coverage_pct"]) for s in splits]
    missed = [s for s, c in coverage if not c >= GOAL_COVERAGE_PCT]
    out.append(f"- 80% time intervals (goal: cover at least {GOAL_COVERAGE_PCT:.0f}% of the epochs): "
               + ", ".join(f"{s} {_f(c, 1)}%" for s, c in coverage)
               + (": **met** on every split." if not missed else
                  f": **not met** on {', '.join(missed)} (met on {len(coverage) - len(missed)} of {len(coverage)} splits)."))
    if "config" in splits:
        a, b = rows[("config", "advisor")], rows[("config", "baseline")]
        wins, losses = int(a["epochs_to_target_closer"]), int(b["epochs_to_target_closer"])
        cases = int(a["epochs_to_target_cases"])
        out.append(f"- Epochs to target, leaving a configuration out: median error "
                   f"{_f(a['epochs_to_target_median_err'], 1)} epochs (goal at most {GOAL_EPOCHS_MEDIAN_ERR:.0f}: "
                   f"{_met(a['epochs_to_target_median_err'] <= GOAL_EPOCHS_MEDIAN_ERR)}; baseline "
                   f"{_f(b['epochs_to_target_median_err'], 1)}). Fractional median "
                   f"{_f(a['epochs_to_target_median_err_frac'], 2)} against {_f(b['epochs_to_target_median_err_frac'], 2)} "
                   f"({_than(a['epochs_to_target_median_err_frac'], b['epochs_to_target_median_err_frac'])}), "
                   f"mean {_f(a['epochs_to_target_mean_err'], 2)} against {_f(b['epochs_to_target_mean_err'], 2)} "
                   f"({_than(a['epochs_to_target_mean_err'], b['epochs_to_target_mean_err'])}).")
        out.append(f"- Paired, case by case on whole epochs: of {cases} (run, target) cases the advisor is strictly "
                   f"closer to the truth in {wins}, the baseline in {losses}, {cases - wins - losses} tie "
                   f"(two-sided sign test on the untied cases: p = {sign_test_p(wins, losses):.2f}).")
        out.append(f"- Regret, leaving a configuration out: median {_f(a['regret_median_pct'], 1)}% "
                   f"(baseline {_f(b['regret_median_pct'], 1)}%), mean {_f(a['regret_mean_pct'], 1)}% "
                   f"(baseline {_f(b['regret_mean_pct'], 1)}%), infeasible picks {_i(a['regret_infeasible'])} "
                   f"of {_i(a['regret_cases'])} (baseline {_i(b['regret_infeasible'])}): "
                   f"on mean regret {_than(a['regret_mean_pct'], b['regret_mean_pct'])}.")
    for split, what in (("gpu_family", "an unseen GPU family"), ("model", "an unseen model")):
        if split in splits:
            a, b = rows[(split, "advisor")], rows[(split, "baseline")]
            out.append(f"- Epochs to target on {what}: median / mean error {_f(a['epochs_to_target_median_err'], 1)} / "
                       f"{_f(a['epochs_to_target_mean_err'], 2)} against the baseline's "
                       f"{_f(b['epochs_to_target_median_err'], 1)} / {_f(b['epochs_to_target_mean_err'], 2)} "
                       f"(on the mean: {_than(a['epochs_to_target_mean_err'], b['epochs_to_target_mean_err'])}).")
    return out


def _must_show(rows, splits) -> list[str]:
    """Issue 21's figures: time MAPE, the worst run, and the runs inside their 80% interval,
    on the holdout and the grouped splits, against the goals."""
    shown = [s for s in MUST_SHOW if s in splits]
    if not shown:
        return []
    lines = ["| split | method | runs | time MAPE % (goal < 8) | worst run % (goal < 30) "
             "| runs inside their 80% interval % (goal >= 80) |", "|---|---|---|---|---|---|"]
    for split in shown:
        for method in ("advisor", "baseline"):
            r = rows[(split, method)]
            lines.append(f"| {split} | {method} | {_i(r['time_runs'])} | {_f(r['time_mape_pct'], 1)} "
                         f"| {_f(r['time_worst_run_ape_pct'], 1)} | {_f(r['time_interval_run_coverage_pct'], 1)} |")
    out = ["", "## Issue 21's figures: the holdout apart from the post-selection splits", "",
           "Reproduce (from the repository root, about 5 minutes on 2 busy cores): `disttrain advise --evaluate` "
           "(writes `benchmarks/results/advisor_evaluation.csv`), then `python -m disttrain.advisor.results_page`.", "",
           "A run is a configuration on one GPU type; its error is its mean prediction against its median "
           "epoch time, and its interval holds it or not. The cross-validated splits are **post-selection**: "
           "every design choice of the time model was scored on them (before the holdout was frozen, on all 31 "
           "configurations, the holdout's included; since, on the other 22 only). The holdout was drawn at random "
           "(by hash, `advisor/holdout.py`) and frozen before the out-of-range work and calibration, and no "
           "choice has been scored on it since; but the time model's earlier design saw its configurations in "
           "those earlier cross-validations, so it is independent of the choices made after the freeze only. "
           "Its first score, taken right after the freeze and before any of that work: time MAPE 8.9%, worst run "
           "19.3%, runs inside their interval 93.8% (the out-of-range path leaves every prediction inside the "
           "logs' range as it was).", "",
           "Since then the time model changed four times, each change chosen on the cross-validated splits only and "
           "followed by one score of the holdout, its design frozen. First, the communication rate got a shrunk "
           "correction per GPU family (NVLink on the SXM2 boards, PCIe on the others), among variants scored "
           "there and not taken (a smooth maximum of loading and compute, loading shared by the GPUs of a host, "
           "a loading correction per family and regime, runs weighted by epochs, other shrinkage penalties and "
           "Cauchy scales, bagging over configurations). Then communication overlaps the GPU work (the two "
           "combine as sqrt(gpu^2 + comm^2), not as a sum) and the exposed all-reduce per step no longer grows "
           "with the GPU count, among variants scored there and not taken (a speed axis mixing the data sheets' "
           "TFLOPS and memory bandwidth, per-step launches on the host, a weaker shrinkage of the recipe factor, "
           "other overlap exponents, an all-reduce cost per step without the parameter count). Then a run on a "
           "slowed host (its evaluation pass, the same work at any learning rate, took more than twice its "
           "regime's usual share of the epoch: the learning-rate-0.01 runs of the development configurations) "
           "informs no rate and no recipe factor, among variants scored there and not taken (the same with the "
           "recipe factor still fitted on those runs). Then every run is weighted alike in the fit, not by the "
           "square root of its epoch count (the count is the regime's recipe, not the measurement's precision), "
           "among variants scored there and not taken (other penalties, Cauchy scales and a soft-L1 loss, with "
           "either weights; weights linear in the epochs; a loading correction per model; launches scaled by a "
           "power of the batch size; launches on the host; a launch correction per family). The holdout "
           "rows below are each model's one score; the cross-validated rows are post-selection.", "",
           "| split | " + " | ".join(f"{name} time model: MAPE / worst run / inside %" for name, _ in EARLIER_TIME_MODELS)
           + " | this time model: MAPE / worst run / inside % |",
           "|---|" + "---|" * (len(EARLIER_TIME_MODELS) + 1)]
    for split in shown:
        a = rows[(split, "advisor")]
        kind = "scored once after each change" if split == "holdout" else "post-selection"
        earlier = " | ".join(" / ".join(f"{v:.1f}" for v in figures[split]) for _, figures in EARLIER_TIME_MODELS)
        out.append(f"| {split} ({kind}) | {earlier} "
                   f"| {_f(a['time_mape_pct'], 1)} / {_f(a['time_worst_run_ape_pct'], 1)} "
                   f"/ {_f(a['time_interval_run_coverage_pct'], 1)} |")
    out += ["", "Against the baseline (the earlier model, LightGBM on the raw columns):", ""] + lines
    if "holdout" in shown:
        a = rows[("holdout", "advisor")]
        out += ["", f"- Holdout, time MAPE {_f(a['time_mape_pct'], 1)}% (goal below {GOAL_HOLDOUT_MAPE_PCT:.0f}%: "
                    f"{_met(a['time_mape_pct'] < GOAL_HOLDOUT_MAPE_PCT)}), worst run "
                    f"{_f(a['time_worst_run_ape_pct'], 1)}% (goal below {GOAL_WORST_RUN_PCT:.0f}%: "
                    f"{_met(a['time_worst_run_ape_pct'] < GOAL_WORST_RUN_PCT)}), runs inside their 80% interval "
                    f"{_f(a['time_interval_run_coverage_pct'], 1)}% (goal at least {GOAL_COVERAGE_PCT:.0f}%: "
                    f"{_met(a['time_interval_run_coverage_pct'] >= GOAL_COVERAGE_PCT)})."]
    grouped = [s for s in shown if s != "holdout"]
    for split in grouped:
        a = rows[(split, "advisor")]
        out.append(f"- {split} (post-selection): MAPE {_f(a['time_mape_pct'], 1)}% "
                   f"({_met(a['time_mape_pct'] < GOAL_HOLDOUT_MAPE_PCT)}), worst run "
                   f"{_f(a['time_worst_run_ape_pct'], 1)}% ({_met(a['time_worst_run_ape_pct'] < GOAL_WORST_RUN_PCT)}), "
                   f"runs inside {_f(a['time_interval_run_coverage_pct'], 1)}% "
                   f"({_met(a['time_interval_run_coverage_pct'] >= GOAL_COVERAGE_PCT)}).")
    return out


def render(csv_path: Path = CSV_PATH) -> str:
    """The results page for the evaluation CSV at ``csv_path``, as Markdown."""
    rows = read_rows(Path(csv_path))
    present = {s for s, _ in rows}
    splits = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
    lines = [
        "# Training-cost advisor: evaluation results",
        "",
        "<!-- Generated by `python -m disttrain.advisor.results_page` from",
        "     benchmarks/results/advisor_evaluation.csv (written by `disttrain advise --evaluate`).",
        "     Do not edit by hand: tests/test_advisor_results.py checks this page equals the generated one. -->",
        "",
        "The current numbers of `disttrain advise --evaluate`. How the models work and how each choice",
        "was made: [`advisor.md`](advisor.md); what the splits, metrics and baseline are:",
        "[`advisor.md#evaluation`](advisor.md#evaluation). Every score is out of fold; the rows hold out:",
        "",
    ]
    lines += [f"- `{s}`: {SPLITS.get(s, s)}" for s in splits]
    lines += ["", "## Table", ""]
    lines += _table(rows, splits)
    lines += [
        "",
        "Time columns are over every epoch row; the interval columns are the advisor's 80% intervals",
        "(the baseline has none). Epochs to target: every (run, target in 0.5/0.6/0.7/0.75/0.8) the",
        "run really reaches; the fractional columns read the crossing between epochs (whole epochs",
        "make the median move in steps of one). \"Strictly closer\": the (run, target) cases where",
        "that method's whole-epoch prediction is nearer the truth than the other's.",
        "",
        "## Against the goals and the baseline",
        "",
    ]
    lines += _findings(rows, splits)
    lines += _must_show(rows, splits)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disttrain.advisor.results_page",
                                description="write docs/advisor_results.md from the advisor's evaluation CSV")
    p.add_argument("--csv", type=Path, default=CSV_PATH, help=f"evaluation CSV (default: {CSV_PATH})")
    p.add_argument("--out", type=Path, default=PAGE_PATH, help=f"page to write (default: {PAGE_PATH})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page differs")
    args = p.parse_args(argv)
    try:
        page = render(args.csv)
    except (OSError, ValueError) as e:
        print(f"results_page: {e}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.exists() else None
        if current != page:
            print(f"results_page: {args.out} is stale; regenerate it with python -m disttrain.advisor.results_page",
                  file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
