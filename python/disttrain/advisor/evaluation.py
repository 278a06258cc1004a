"""Evaluation that cannot flatter: every score is out of fold, with folds
grouped so that no run (or configuration, GPU family, model) sits on both sides.

Splits:
    run          GroupKFold(5) over runs (a run: one configuration on one GPU type)
    config       leave one configuration out (all its GPU types at once)
    gpu_family   leave one GPU family out
    model        leave one model out
    holdout      the frozen development holdout (holdout.py): fitted once on all
                 other runs, scored once

The four cross-validated splits run on the runs outside the holdout only:
they are what design choices are scored on; the holdout is not.

For each split and each of our model and the reproduced baseline: MAE, RMSE
and MAPE of time per epoch (on every epoch row), per run (a configuration on
one GPU type) the worst relative error of its median epoch time and whether
the 80% interval holds it, the error in epochs to reach a
target accuracy (its median and mean, whole and fractional, and the paired
count of cases where each method is strictly closer), and the regret of the
recommendation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from ._threads import one_blas_thread
from .baseline import RawColumnsBaseline, random_split_scores
from .curve_model import TARGETS, LearningCurveModel, epochs_to_target, target_crossings
from .hardware import DEFAULT_PRICES
from .holdout import holdout_configs
from .loading import fold_ranks, load_raw, runs_table
from .time_model import EpochTimeModel, refused

SPLITS = {"run": "run_id", "config": "config_id", "gpu_family": "gpu_family", "model": "model_name",
          "holdout": "config_id"}
CROSS_VALIDATED = ("run", "config", "gpu_family", "model")


def _folds(runs: pd.DataFrame, split: str, max_folds: int | None = None):
    """(train, test) row indices of each fold. ``max_folds`` caps the number of
    folds: the groups are then dealt into that many folds (GroupKFold), so
    every test row is still out of fold, with fewer, larger groups left out.
    The holdout is one fold: the frozen configurations against all others."""
    groups = runs[SPLITS[split]].to_numpy()
    if split == "holdout":
        held = np.isin(groups, sorted(holdout_configs()))
        yield np.nonzero(~held)[0], np.nonzero(held)[0]
        return
    n_groups = len(np.unique(groups))
    folds = min(5 if split == "run" else n_groups, n_groups, max_folds or n_groups)
    if split == "run" or folds < n_groups:
        yield from GroupKFold(n_splits=folds).split(runs, groups=groups)
        return
    for value in np.unique(groups):
        yield np.nonzero(groups != value)[0], np.nonzero(groups == value)[0]


def out_of_fold(epochs: pd.DataFrame, raw: pd.DataFrame, split: str, run_fits: pd.DataFrame,
                progress=None, max_folds: int | None = None) -> pd.DataFrame:
    """Out-of-fold predictions for every run and epoch, ours and the baseline's.

    Args:
        progress: optional ``progress(split, folds_done, folds)``, called after each fold.
        max_folds: at most this many folds (see :func:`_folds`); None: the split as defined.

    Returns:
        ``epochs`` plus ``time_pred``, ``time_low``, ``time_high``, ``acc_pred``
        (ours) and ``time_base``, ``acc_base`` (baseline).
    """
    runs = runs_table(epochs)
    out = []
    folds = list(_folds(runs, split, max_folds))
    for done, (train, test) in enumerate(folds, 1):
        train_ids = set(runs["run_id"].iloc[train])
        test_runs = runs.iloc[test]
        time_model = EpochTimeModel().fit(runs.iloc[train])
        baseline = RawColumnsBaseline().fit(raw[raw["run_id"].isin(train_ids)])
        # The ensemble's row model is the baseline's accuracy model, fitted once.
        curve_model = LearningCurveModel(interval_folds=0).fit(epochs[epochs["run_id"].isin(train_ids)],
                                                               run_fits[run_fits["run_id"].isin(train_ids)],
                                                               rows=baseline)
        times = time_model.predict(test_runs).set_index(test_runs["run_id"])
        # A prediction the advisor refuses (time_model.refused: a device without a data sheet in a
        # regime its training runs lack) is not scored, for either method.
        refused_ids = set(test_runs["run_id"][refused(runs.iloc[train], test_runs)])
        times.loc[times.index.isin(refused_ids), ["epoch_time_s", "epoch_time_s_low", "epoch_time_s_high"]] = np.nan
        test_raw = raw[raw["run_id"].isin(set(test_runs["run_id"]))].copy()
        test_raw["time_base"] = np.where(test_raw["run_id"].isin(refused_ids), np.nan, baseline.predict_time(test_raw))
        test_raw["acc_base"] = baseline.predict_accuracy(test_raw)
        base = test_raw.groupby(["run_id", "epoch"])[["time_base", "acc_base"]].mean()
        rows = epochs[epochs["run_id"].isin(set(test_runs["run_id"]))].copy()
        rows["time_pred"] = rows["run_id"].map(times["epoch_time_s"])
        rows["time_low"] = rows["run_id"].map(times["epoch_time_s_low"])
        rows["time_high"] = rows["run_id"].map(times["epoch_time_s_high"])
        rows["acc_pred"] = np.nan
        groups = rows.groupby("run_id").groups
        predicted = curve_model.predict_accuracy(test_runs, [rows.loc[groups[r], "epoch"].to_numpy(float) + 1
                                                             for r in test_runs["run_id"]])
        for run_id, values in zip(test_runs["run_id"], predicted):
            rows.loc[groups[run_id], "acc_pred"] = values
        rows = rows.join(base, on=["run_id", "epoch"])
        out.append(rows)
        if progress is not None:
            progress(split, done, len(folds))
    return pd.concat(out).sort_values(["run_id", "epoch"])


def time_scores(pred: pd.DataFrame, column: str) -> dict:
    """Errors over every epoch row, and per run (its median epoch time against
    the mean prediction for its rows): the worst run's relative error. Rows
    without a prediction (refused: see out_of_fold) are not scored."""
    pred = pred[pred[column].notna()]
    error = pred[column] - pred["epoch_timings"]
    runs = pred.groupby("run_id").agg(true=("epoch_timings", "median"), guess=(column, "mean"))
    return {"time_mae_s": error.abs().mean(), "time_rmse_s": float(np.sqrt((error ** 2).mean())),
            "time_mape_pct": 100 * (error.abs() / pred["epoch_timings"]).mean(),
            "time_worst_run_ape_pct": 100 * float((runs["guess"] / runs["true"] - 1).abs().max()),
            "time_runs": len(runs)}


def interval_scores(pred: pd.DataFrame) -> dict:
    """How often the advisor's 80% time intervals hold the truth: every epoch
    row, and every run's median epoch time (a run's interval is one interval);
    rows without a prediction (refused) are not scored."""
    pred = pred[pred["time_low"].notna()]
    inside = (pred["epoch_timings"] >= pred["time_low"]) & (pred["epoch_timings"] <= pred["time_high"])
    runs = pred.groupby("run_id").agg(true=("epoch_timings", "median"), low=("time_low", "first"),
                                      high=("time_high", "first"))
    return {"time_interval_coverage_pct": 100 * inside.mean(),
            "time_interval_run_coverage_pct": 100 * ((runs["true"] >= runs["low"]) & (runs["true"] <= runs["high"])).mean(),
            "time_interval_high_over_low": (pred["time_high"] / pred["time_low"]).median()}


def target_table(pred: pd.DataFrame, column: str, targets=TARGETS) -> pd.DataFrame:
    """Per run and target (that the run really reaches): true and predicted epochs.
    A prediction that never reaches the target counts as the run's last epoch + 1."""
    rows = []
    for run_id, run in pred.groupby("run_id"):
        epochs = run["epoch"].to_numpy() + 1
        accuracy, predicted = run["test_acc"].to_numpy(), run[column].to_numpy()
        for target in targets:
            true, guess = target_crossings(accuracy, predicted, epochs, target, epochs_to_target)
            if not np.isfinite(true):
                continue
            true_frac, guess_frac = target_crossings(accuracy, predicted, epochs, target)
            rows.append({"run_id": run_id, "target": target, "true_epochs": true, "predicted_epochs": guess,
                         "true_epochs_frac": true_frac, "predicted_epochs_frac": guess_frac})
    table = pd.DataFrame(rows)
    table["error_epochs"] = (table["predicted_epochs"] - table["true_epochs"]).abs()
    table["error_epochs_frac"] = (table["predicted_epochs_frac"] - table["true_epochs_frac"]).abs()
    return table


def regret_table(pred: pd.DataFrame, time_column: str, acc_column: str, prices=None, targets=TARGETS) -> pd.DataFrame:
    """For each model and target: the run the predictions call cheapest, its true
    cost, and the cheapest true cost among the logged runs of that model."""
    prices = prices or DEFAULT_PRICES
    rows = []
    for model_name, model_rows in pred.groupby("model_name"):
        for target in targets:
            costs = []
            for run_id, run in model_rows.groupby("run_id"):
                epochs = run["epoch"].to_numpy() + 1
                price = prices.get(run["gpu_family"].iloc[0], np.nan) * run["num_of_gpus"].iloc[0]
                true_k = epochs_to_target(run["test_acc"].to_numpy(), epochs, target)
                pred_k = epochs_to_target(run[acc_column].to_numpy(), epochs, target)
                true_cost = run["epoch_timings"].to_numpy()[: int(true_k)].sum() / 3600 * price if np.isfinite(true_k) else np.inf
                pred_cost = pred_k * run[time_column].mean() / 3600 * price if np.isfinite(pred_k) else np.inf
                costs.append((run_id, true_cost, pred_cost))
            frame = pd.DataFrame(costs, columns=["run_id", "true_cost", "pred_cost"])
            if not np.isfinite(frame["true_cost"]).any() or not np.isfinite(frame["pred_cost"]).any():
                continue
            chosen = frame.loc[frame["pred_cost"].idxmin()]
            best = frame["true_cost"].min()
            rows.append({"model_name": model_name, "target": target, "chosen_run": chosen["run_id"],
                         "chosen_true_cost": chosen["true_cost"], "best_true_cost": best,
                         "regret": chosen["true_cost"] - best,
                         "regret_pct": 100 * (chosen["true_cost"] / best - 1)})
    return pd.DataFrame(rows)


@one_blas_thread
def evaluate(paths_or_dataframe=None, splits=tuple(SPLITS), progress=None, max_folds: int | None = None) -> dict:
    """Runs the whole evaluation (``progress`` and ``max_folds`` as for :func:`out_of_fold`).
    The cross-validated splits see the runs outside the frozen holdout only; the
    holdout split (skipped when the data holds none of its configurations, or
    nothing else) is fitted on those runs and scored on the holdout's.

    Returns:
        dict with ``summary`` (one row per split and method), ``random_split``
        (the baseline's original evaluation) and ``predictions`` (split -> out-of-fold rows).
    """
    raw = load_raw(paths_or_dataframe)
    epochs = fold_ranks(raw)
    run_fits = LearningCurveModel().fit_runs(epochs)
    held = epochs["config_id"].isin(holdout_configs())
    development = (epochs[~held], raw[~raw["config_id"].isin(holdout_configs())])
    summary, predictions = [], {}
    for split in splits:
        if split == "holdout":
            if held.all() or not held.any():
                continue
            pred = out_of_fold(epochs, raw, split, run_fits, progress)
        else:
            pred = out_of_fold(*development, split, run_fits, progress, max_folds)
        predictions[split] = pred
        methods = [("advisor", "time_pred", "acc_pred"), ("baseline", "time_base", "acc_base")]
        tables = {method: target_table(pred, acc_column) for method, _, acc_column in methods}
        for method, time_column, acc_column in methods:
            targets = tables[method]
            other = tables["baseline" if method == "advisor" else "advisor"]
            regret = regret_table(pred, time_column, acc_column)
            row = {"split": split, "method": method, **time_scores(pred, time_column),
                   "epochs_to_target_median_err": targets["error_epochs"].median(),
                   "epochs_to_target_mean_err": targets["error_epochs"].mean(),
                   "epochs_to_target_median_err_frac": targets["error_epochs_frac"].median(),
                   "epochs_to_target_mean_err_frac": targets["error_epochs_frac"].mean(),
                   # Paired, on whole epochs: the (run, target) cases where this method is
                   # strictly closer than the other one (the rest are ties or the other's).
                   "epochs_to_target_closer": int((targets["error_epochs"].to_numpy() < other["error_epochs"].to_numpy()).sum()),
                   "epochs_to_target_cases": len(targets),
                   "accuracy_mae": (pred[acc_column] - pred["test_acc"]).abs().mean(),
                   "regret_median_pct": regret["regret_pct"].median(),
                   "regret_mean_pct": regret["regret_pct"].replace(np.inf, np.nan).mean(),
                   "regret_infeasible": int(np.isinf(regret["regret_pct"]).sum()),
                   "regret_cases": len(regret)}
            if method == "advisor":
                row.update(interval_scores(pred))
            summary.append(row)
    return {"summary": pd.DataFrame(summary), "random_split": random_split_scores(raw), "predictions": predictions}
