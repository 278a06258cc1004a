"""Accuracy against epochs: a parametric learning curve per run, its
parameters predicted from the configuration.

Before the first learning-rate milestone the curve is Optimus's
``acc(k) = b2 - 1 / (b0 * k + b1)``, written here with readable parameters:
``acc(k) = a_inf - (a_inf - a_1) / (1 + rate * (k - 1))`` (k = epochs trained,
a_1 the accuracy after one epoch, a_inf the plateau). The logs' recipe divides
the learning rate by 10 at epoch 60, which lifts the plateau at once; after the
milestone the curve stays at its milestone value plus ``jump``.

Each run's curve is fitted by least squares. A configuration's parameters
(logit a_inf, logit a_1, log rate, jump) are predicted in two steps: ridge
regressions from the configuration give a prior; LightGBM, trained on every
epoch row of the training runs, predicts the first 30 epochs of the
configuration's trajectory, and the curve is fitted to that trajectory under
the prior (MAP). Boosting finds the neighbours (same model and batch, other GPU
count); the parametric form extrapolates past the epochs seen, through the
milestone, and gives epochs-to-target. Intervals come from the out-of-fold
errors of the predicted parameters (grouped by configuration): the curve is
recomputed with each error vector added and quantiles are taken. On top
(the hybrid), a second LightGBM predicts each epoch's accuracy from the
configuration, the epoch, its place relative to the first milestone and the
curve's own prediction, trained with the curve the training runs get out of
fold; the prediction moves from the curve towards it by a weight chosen, with
the booster's settings, by an inner cross-validation grouped by
configuration (the smallest median error in epochs to the targets). The
advisor's accuracy is the equal-weight average of that (hybrid) curve and a
row model, LightGBM on the logged columns of every row (baseline.
RawColumnsBaseline, trained on the same runs): the curve extrapolates, the
trees interpolate between neighbouring configurations; for a model or GPU the
trees never saw, the curve stands alone. With
the first k epochs of a running job observed, the parameters are refitted with
the prediction as a prior (MAP), once per error vector, so the interval narrows
as the job runs.
"""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ._threads import one_blas_thread
from .baseline import RawColumnsBaseline
from .features import derive

PARAMS = ["logit_a_inf", "logit_a_1", "log_rate", "jump"]
_BOUNDS = (np.array([-3.0, -4.0, -6.0, -0.3]), np.array([4.5, 3.0, 3.0, 0.5]))
_NOISE = 0.03
_HORIZON = 30  # every logged run has at least 30 epochs before its first milestone
# The LightGBM residual model on top of the curve: small trees and large leaves
# (about 3,000 epoch rows from about 50 runs). Fixed a priori, not tuned on an
# evaluation split.
_RESIDUAL_BOOSTS = (
    dict(n_estimators=150, learning_rate=0.05, num_leaves=8, min_child_samples=50, reg_lambda=5.0),
    dict(n_estimators=100, learning_rate=0.1, num_leaves=31, min_child_samples=20),  # LightGBM's defaults
)
_RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = (0.5, 0.6, 0.7, 0.75, 0.8)  # the evaluation's targets
# The ensemble: equal weights for the curve (with its hybrid correction) and
# the row model, fixed a priori (no weight was searched).
_ENSEMBLE_WEIGHT = 0.5


def _logit(p):
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def first_milestone(milestones, num_epochs) -> float:
    """The first learning-rate milestone inside the run ('60,80' -> 60), else inf."""
    values = [float(v) for v in str(milestones).replace(";", ",").split(",") if v.strip()]
    values = [v for v in values if v < float(num_epochs)]
    return min(values) if values else np.inf


def curve(theta: np.ndarray, epochs: np.ndarray, milestone: float) -> np.ndarray:
    """Accuracy after ``epochs`` (1-based) for parameters ``theta`` (see PARAMS); for a 2-D
    ``theta`` (one row of parameters per curve), one row of accuracies per curve."""
    theta = np.asarray(theta, dtype=float)
    if theta.ndim == 2:
        theta = theta.T[:, :, None]  # each parameter a column, broadcast against the epochs
    a_inf, a_1 = _sigmoid(theta[0]), _sigmoid(theta[1])
    rate = np.exp(theta[2])
    before = a_inf - (a_inf - a_1) / (1 + rate * (np.minimum(epochs, milestone) - 1))
    jump = np.where(np.isfinite(theta[3]), theta[3], 0.0)
    return np.where(epochs > milestone, np.clip(before + jump, 0.0, 1.0), before)


# Fits made in this process, by everything they depend on: a fit is a pure function of its inputs,
# and the same ones come again (each run's curve in every fit on logs that hold it, a recommendation's
# candidates on every GPU type, the web page's repeated queries). The result is the same, bit for bit.
_FITTED: dict = {}
_FITTED_MAX = 50_000


def _fit_key(*values) -> tuple:
    arrays = [None if v is None else np.asarray(v) for v in values]
    return tuple(None if a is None else (a.dtype.str, a.shape, a.tobytes()) for a in arrays)


def fit_run(epochs: np.ndarray, acc: np.ndarray, milestone: float, prior=None, prior_scale=None) -> np.ndarray:
    """Least-squares fit of one run's curve; with ``prior`` (mean, scale) a MAP fit."""
    key = _fit_key(epochs, acc, float(milestone), prior, prior_scale)
    theta = _FITTED.get(key)
    if theta is None:
        theta = _fit_run(epochs, acc, milestone, prior, prior_scale)
        if len(_FITTED) >= _FITTED_MAX:
            _FITTED.clear()
        _FITTED[key] = theta
    return theta.copy()


def _fit_run(epochs: np.ndarray, acc: np.ndarray, milestone: float, prior, prior_scale) -> np.ndarray:
    before = epochs <= milestone
    start = np.array([_logit(np.max(acc[before]) if before.any() else np.max(acc)),
                      _logit(acc[0]), 0.0, 0.0]) if prior is None else np.array(prior, dtype=float)
    has_after = bool((~before).any())
    if not np.isfinite(start[3]):
        start[3] = 0.0

    def residual(theta):
        fit = curve(theta if has_after else np.append(theta[:3], 0.0), epochs, milestone) - acc
        if prior is None:
            return fit
        # A test accuracy scatters by ~0.03 from epoch to epoch; the prior's
        # scale is its out-of-fold error: one standard deviation of either costs the same.
        penalty = (theta[:3] - prior[:3]) / prior_scale[:3] * _NOISE
        extra = [(theta[3] - start[3]) / prior_scale[3] * _NOISE] if has_after else []
        return np.concatenate([fit, penalty, extra])

    x0 = start if has_after else start[:3]
    # Bounds keep near-linear runs from trading a huge plateau against a tiny rate.
    low, high = _BOUNDS[0][: len(x0)], _BOUNDS[1][: len(x0)]
    x0 = np.clip(x0, low + 1e-6, high - 1e-6)
    solution = least_squares(residual, x0, bounds=(low, high), loss="soft_l1", f_scale=0.03)
    theta = solution.x if has_after else np.append(solution.x, np.nan if prior is None else start[3])
    return theta


def _features(configs: pd.DataFrame) -> pd.DataFrame:
    d = derive(configs)
    return pd.DataFrame({
        "log_params": np.log(d["params"].astype(float)),
        "log_global_batch": np.log(d["global_batch"]),
        "log_steps": np.log(d["steps_per_epoch"]),
        "log_lr": np.log(d["learning_rate"].astype(float)),
        "is_distributed": d["is_distributed"].astype(float),
        "distribute_data": d["distribute_data"].astype(float),
    }, index=configs.index)


def _row_by_row(regression, X: pd.DataFrame) -> np.ndarray:
    """A fitted StandardScaler + Ridge pipeline's predictions, each row's computed alone: the
    same value for a configuration whatever else is predicted beside it. (The pipeline's own
    predict is a matrix product, whose BLAS kernel and rounding depend on the number of rows: on
    an AVX-512 host a row came out 1e-16 apart alone and in a batch, and its curve fit 1e-8 apart.)"""
    scaled = regression[:-1].transform(X)
    ridge = regression[-1]
    return (np.asarray(scaled, dtype=float) * ridge.coef_).sum(axis=1) + ridge.intercept_


def _booster(settings: dict):
    return lgb.LGBMRegressor(**settings, verbose=-1, n_jobs=1)


def _median_target_error(predicted, acc, epochs, starts) -> float:
    """Median (then mean, to break ties) error in fractional epochs to each
    target over runs laid end to end (run i spans starts[i]:starts[i+1]); a
    target never predicted counts as the run's length + 1."""
    errors = []
    for i in range(len(starts) - 1):
        span = slice(starts[i], starts[i + 1])
        for target in TARGETS:
            true, guess = target_crossings(acc[span], predicted[span], epochs[span], target)
            if np.isfinite(true):
                errors.append(abs(guess - true))
    return float(np.median(errors) + 1e-3 * np.mean(errors)) if errors else 0.0


def _row_features(configs: pd.DataFrame, epochs: np.ndarray, milestones: np.ndarray, base: np.ndarray) -> pd.DataFrame:
    """Features of the residual model, one row per (configuration, epoch):
    the configuration, the epoch (1-based), where it sits relative to the first
    learning-rate milestone, and the curve's own prediction."""
    X = _features(configs).reset_index(drop=True)
    has = np.isfinite(milestones)
    X["epoch"] = epochs
    X["epochs_after_milestone"] = np.where(has, np.maximum(epochs - np.where(has, milestones, 0), 0), 0.0)
    X["milestone_fraction"] = np.where(has, np.minimum(epochs / np.where(has, milestones, 1), 1.0), 0.0)
    X["curve"] = base
    return X


class LearningCurveModel:
    """Predicts test accuracy per epoch for a configuration, with an interval.

    Args:
        coverage: two-sided coverage of the intervals.
        alpha: ridge penalty of the parameter regressions.
        interval_folds: folds of the grouped cross-validation that sizes the
            intervals; 0 skips it (point predictions only, as the evaluation needs).

    Example::

        >>> model = LearningCurveModel().fit(epochs)     # epochs: loading.load_epochs()
        >>> model.predict_curve(runs.iloc[0], np.arange(1, 31))
    """

    def __init__(self, coverage: float = 0.8, alpha: float = 1.0, interval_folds: int = 5, hybrid: bool = True,
                 ensemble: bool = True):
        self.coverage = coverage
        self.alpha = alpha
        self.interval_folds = interval_folds
        self.hybrid = hybrid
        self.ensemble = ensemble

    def fit_runs(self, epochs: pd.DataFrame) -> pd.DataFrame:
        """One fitted curve per run: the configuration columns plus PARAMS."""
        rows = []
        for run_id, run in epochs.dropna(subset=["test_acc"]).groupby("run_id", sort=True):
            if len(run) < 5:
                continue
            first = run.iloc[0]
            milestone = first_milestone(first["milestones"], first["num_epochs"])
            theta = fit_run(run["epoch"].to_numpy(float) + 1, run["test_acc"].to_numpy(float), milestone)
            rows.append({**first.drop(["epoch", "epoch_timings", "test_timings", "test_acc", "train_loss"],
                                      errors="ignore").to_dict(), **dict(zip(PARAMS, theta))})
        return pd.DataFrame(rows)

    def _fit_regressions(self, runs: pd.DataFrame, epochs: pd.DataFrame) -> dict:
        models = {}
        X = _features(runs)
        for name in PARAMS:
            known = runs[name].notna().to_numpy()
            if known.sum() < 2:
                models[name] = float(np.nanmean(runs[name])) if known.any() else 0.0
                continue
            models[name] = make_pipeline(StandardScaler(), Ridge(alpha=self.alpha)).fit(X[known], runs.loc[known, name])
        rows = epochs[epochs["run_id"].isin(set(runs["run_id"]))].dropna(subset=["test_acc"])
        trajectory = lgb.LGBMRegressor(n_estimators=100, verbose=-1, n_jobs=1)
        models["trajectory"] = trajectory.fit(_features(rows).assign(epoch=rows["epoch"].to_numpy(float) + 1),
                                              rows["test_acc"])
        return models

    @staticmethod
    def _predict_params(models: dict, configs: pd.DataFrame, prior_scale: np.ndarray) -> np.ndarray:
        X = _features(configs)
        columns = [np.full(len(X), m) if isinstance(m, float) else _row_by_row(m, X)
                   for name, m in models.items() if name in PARAMS]
        prior = np.column_stack(columns)
        epochs = np.arange(1, _HORIZON + 1, dtype=float)
        grid = X.loc[np.repeat(X.index.to_numpy(), _HORIZON)].assign(epoch=np.tile(epochs, len(X)))
        trajectories = models["trajectory"].predict(grid).reshape(len(X), _HORIZON)
        # The parameters depend on the configuration's features alone, not its GPU: the candidates of a
        # recommendation (every GPU type) and the runs of one configuration share a fit (fit_run's).
        out = np.empty_like(prior)
        for i, (center, trajectory) in enumerate(zip(prior, trajectories)):
            out[i] = fit_run(epochs, trajectory, np.inf, prior=center, prior_scale=prior_scale)
            out[i, 3] = center[3]
        return out

    @one_blas_thread  # as in Advisor.fit, for a fit called alone too (the example above)
    def fit(self, epochs: pd.DataFrame, run_fits: pd.DataFrame | None = None,
            rows: RawColumnsBaseline | None = None) -> "LearningCurveModel":
        """Fits per-run curves on an epochs table (loading.load_epochs) and the
        regressions from configuration to curve parameters.

        Args:
            epochs: one row per run and epoch.
            run_fits: the per-run curves of these runs, when already fitted
                (fit_runs); a run's own curve does not depend on the others.
            rows: the row model of the ensemble, fitted on the same runs'
                file rows (``RawColumnsBaseline(time=False).fit(raw)``);
                without it (or with ``ensemble=False``) the prediction is the
                curve alone.

        Returns:
            self
        """
        runs = self.fit_runs(epochs) if run_fits is None else run_fits
        if len(runs) < 3:
            from .errors import AdvisorInputError
            raise AdvisorInputError("need at least 3 runs with test_acc to fit learning curves")
        self.runs_ = runs
        groups = runs["config_id"].to_numpy()
        errors: Any = [np.zeros((1, len(PARAMS)))]  # per fold, then concatenated
        folds = min(self.interval_folds, len(np.unique(groups)))
        # A weak prior: the spread of the parameters across the training runs.
        values = runs[PARAMS].to_numpy(float)
        counts = np.isfinite(values).sum(axis=0)
        ridge_scale = np.array([np.nanstd(values[:, j]) if counts[j] > 1 else np.nan for j in range(len(PARAMS))])
        self.prior_scale_ = np.maximum(np.nan_to_num(ridge_scale, nan=0.01), 1e-3)
        if self.hybrid:
            folds = max(folds, min(5, len(np.unique(groups))))
        splits = GroupKFold(n_splits=folds).split(runs, groups=groups) if folds >= 2 else []
        oof = np.full((len(runs), len(PARAMS)), np.nan)
        for train, test in splits:
            models = self._fit_regressions(runs.iloc[train], epochs)
            oof[test] = self._predict_params(models, runs.iloc[test], self.prior_scale_)
            errors.append(runs.iloc[test][PARAMS].to_numpy() - oof[test])
        errors = np.concatenate(errors[1:] or errors)
        errors[:, 3] = np.where(np.isfinite(errors[:, 3]), errors[:, 3], 0.0)
        self.errors_ = errors
        self.scale_ = np.maximum(np.std(errors, axis=0), 1e-3)
        self.models_ = self._fit_regressions(runs, epochs)
        self.residual_ = self._fit_residual(runs, epochs, oof) if self.hybrid and np.isfinite(oof[:, :3]).all(axis=1).any() else None
        self.rows_ = rows if self.ensemble else None
        self.max_acc_ = float(epochs["test_acc"].max())
        return self

    @staticmethod
    def _expand(runs: pd.DataFrame, params: np.ndarray, epochs_per_run) -> tuple:
        """Repeats each run's configuration over its epochs; returns the rows,
        epochs, milestones and the curve's prediction, all aligned."""
        index: Any  # per run, then concatenated
        index, grid, milestones, base = [], [], [], []
        for i, ((_, run), ks) in enumerate(zip(runs.iterrows(), epochs_per_run)):
            ks = np.asarray(ks, dtype=float)
            milestone = first_milestone(run.get("milestones", ""), run.get("num_epochs", np.inf))
            index.append(np.full(len(ks), i))
            grid.append(ks)
            milestones.append(np.full(len(ks), milestone))
            base.append(curve(params[i], ks, milestone))
        index = np.concatenate(index)
        return runs.iloc[index], np.concatenate(grid), np.concatenate(milestones), np.concatenate(base)

    def _fit_residual(self, runs: pd.DataFrame, epochs: pd.DataFrame, oof: np.ndarray):
        """LightGBM on the accuracy of every epoch row of the training runs,
        with the curve they get out of fold as a feature (a model of the
        curve's residual instead was measured worse). Its weight (0 to 1) is chosen by a
        grouped cross-validation over these runs: the one with the smallest
        median error in (fractional) epochs to the targets 0.5-0.8."""
        keep = np.isfinite(oof[:, :3]).all(axis=1)
        runs, oof = runs[keep], oof[keep]
        rows = epochs.dropna(subset=["test_acc"])
        groups = rows.groupby("run_id")
        per_run = [groups.get_group(r) for r in runs["run_id"]]
        frame, ks, milestones, base = self._expand(runs, oof, [g["epoch"].to_numpy(float) + 1 for g in per_run])
        acc = np.concatenate([g["test_acc"].to_numpy(float) for g in per_run])
        X = _row_features(frame, ks, milestones, base)
        row_run = np.repeat(np.arange(len(runs)), [len(g) for g in per_run])
        config = runs["config_id"].to_numpy()[row_run]
        folds = min(5, len(np.unique(config)))
        self.residual_weight_ = 0.0
        if folds < 2:
            return None
        starts = np.cumsum([0] + [len(g) for g in per_run])
        best: tuple[float, float, Any] = (np.inf, 0.0, None)
        for settings in _RESIDUAL_BOOSTS:
            inner = np.zeros(len(acc))
            for train, test in GroupKFold(n_splits=folds).split(X, groups=config):
                inner[test] = _booster(settings).fit(X.iloc[train], acc[train]).predict(X.iloc[test]) - base[test]
            for w in _RESIDUAL_WEIGHTS:
                score = _median_target_error(base + w * inner, acc, ks, starts)
                if score < best[0] - 1e-9:
                    best = (score, w, settings)
        _, self.residual_weight_, settings = best
        self.residual_settings_ = settings
        if self.residual_weight_ == 0:
            return None
        return _booster(settings).fit(X, acc)

    def correction(self, configs: pd.DataFrame, params: np.ndarray, epochs_per_run) -> np.ndarray:
        """What moves the curve to the advisor's prediction, for each
        configuration's epochs (concatenated in order): the hybrid's
        residual model, then the ensemble with the row model
        (``(1 - w) (curve + hybrid) + w rows``); zeros with neither."""
        frame, ks, milestones, base = self._expand(configs, params, epochs_per_run)
        shift = np.zeros(len(ks))
        if self.residual_ is not None:
            shift = self.residual_weight_ * (self.residual_.predict(_row_features(frame, ks, milestones, base)) - base)
        if self.rows_ is not None:
            completed = self.rows_.complete(frame.assign(epoch=ks - 1))
            # Trees have nothing to say of a model or GPU they never saw: there the curve stands alone.
            w = np.where(self.rows_.knows(completed), _ENSEMBLE_WEIGHT, 0.0)
            shift = (1 - w) * shift + w * (self.rows_.predict_accuracy(completed) - base)
        return shift

    def predict_accuracy(self, configs: pd.DataFrame, epochs_per_run) -> list:
        """Point predictions (the curve plus its correction) for each configuration
        at its epochs (1-based); a list of arrays."""
        params = self.predict_params(configs)
        base = self._expand(configs, params, epochs_per_run)[3]
        values = np.clip(base + self.correction(configs, params, epochs_per_run), 0.0, 1.0)
        return np.split(values, np.cumsum([len(k) for k in epochs_per_run])[:-1])

    def predict_params(self, configs: pd.DataFrame) -> np.ndarray:
        """Predicted curve parameters (columns PARAMS), one row per configuration."""
        return self._predict_params(self.models_, configs, self.prior_scale_)

    def predict_curve(self, config: pd.Series, epochs, observed=None) -> pd.DataFrame:
        """Accuracy after each of ``epochs`` (1-based) for one configuration.

        Args:
            config: one configuration (loading's columns).
            epochs: epochs trained at which to evaluate the curve.
            observed: optional test accuracies of the job's first epochs, in
                order; the curve is then conditioned on them.

        Returns:
            DataFrame with ``epoch``, ``accuracy``, ``accuracy_low``, ``accuracy_high``.
        """
        epochs = np.asarray(epochs, dtype=float)
        frame = config.to_frame().T.infer_objects()
        milestone = first_milestone(config.get("milestones", ""), config.get("num_epochs", np.inf))
        center = self.predict_params(frame)[0]
        draws = center + self.errors_
        if observed is not None and len(observed):
            seen = np.asarray(observed, dtype=float)
            seen_epochs = np.arange(1, len(seen) + 1, dtype=float)
            center = fit_run(seen_epochs, seen, milestone, prior=center, prior_scale=self.scale_)
            draws = np.array([fit_run(seen_epochs, seen, milestone, prior=d, prior_scale=self.scale_) for d in draws])
        shift: float | np.ndarray = 0.0
        if observed is None or not len(observed):
            # The residual model corrects the predicted curve; a curve refitted
            # to observed epochs follows the job itself and is not shifted.
            shift = self.correction(frame, center[None, :], [epochs])
        curves = curve(draws, epochs, milestone) + shift
        tail = (1 - self.coverage) / 2
        return pd.DataFrame({
            "epoch": epochs.astype(int),
            "accuracy": np.clip(curve(center, epochs, milestone) + shift, 0.0, 1.0),
            "accuracy_low": np.clip(np.quantile(curves, tail, axis=0), 0.0, 1.0),
            "accuracy_high": np.clip(np.quantile(curves, 1 - tail, axis=0), 0.0, 1.0),
        })


def epochs_to_target(accuracy: np.ndarray, epochs: np.ndarray, target: float) -> float:
    """First epoch whose accuracy reaches ``target``; inf when none does."""
    reached = np.nonzero(np.asarray(accuracy) >= target)[0]
    return float(np.asarray(epochs)[reached[0]]) if len(reached) else np.inf


def predict_curves(model: LearningCurveModel, configs: pd.DataFrame, epochs, target: float | None = None) -> tuple:
    """Curves for many configurations at once (no conditioning).

    Args:
        target: also return, per configuration and epoch, the fraction of the
            curve's draws (the prediction moved by each out-of-fold parameter
            error, as for the interval) that have reached ``target`` by then.

    Returns:
        (center, low, high), or (center, low, high, reached) with ``target``:
        arrays of shape (len(configs), len(epochs)).
    """
    epochs = np.asarray(epochs, dtype=float)
    centers = model.predict_params(configs)
    tail = (1 - model.coverage) / 2
    out: tuple[list[Any], list[Any], list[Any], list[Any]] = [], [], [], []
    shifts = model.correction(configs, centers, [epochs] * len(configs)).reshape(len(configs), len(epochs))
    for (_, config), center, shift in zip(configs.iterrows(), centers, shifts):
        milestone = first_milestone(config.get("milestones", ""), config.get("num_epochs", np.inf))
        draws = curve(center + model.errors_, epochs, milestone) + shift
        out[0].append(np.clip(curve(center, epochs, milestone) + shift, 0.0, 1.0))
        out[1].append(np.clip(np.quantile(draws, tail, axis=0), 0.0, 1.0))
        out[2].append(np.clip(np.quantile(draws, 1 - tail, axis=0), 0.0, 1.0))
        if target is not None:
            out[3].append(np.mean(np.maximum.accumulate(draws, axis=1) >= target, axis=0))
    arrays = tuple(np.array(o).reshape(len(configs), len(epochs)) for o in out[: 4 if target is not None else 3])
    return arrays


def fractional_epochs_to_target(accuracy: np.ndarray, epochs: np.ndarray, target: float) -> float:
    """Epochs to target with the crossing interpolated linearly between the
    last epoch below the target and the first one at or above it (inf when
    never reached). Whole epochs make every error a whole number, so the median
    error moves in steps of one epoch; this reading resolves the steps."""
    accuracy = np.asarray(accuracy, dtype=float)
    epochs = np.asarray(epochs, dtype=float)
    reached = np.nonzero(accuracy >= target)[0]
    if not len(reached):
        return np.inf
    i = reached[0]
    if i == 0 or accuracy[i] <= accuracy[i - 1]:
        return float(epochs[i])
    return float(epochs[i - 1] + (target - accuracy[i - 1]) / (accuracy[i] - accuracy[i - 1]) * (epochs[i] - epochs[i - 1]))


def target_crossings(accuracy, predicted, epochs, target: float, read=fractional_epochs_to_target) -> tuple:
    """Epochs to ``target`` (read by ``read``) of a run's measured accuracy and
    of its prediction, as (true, predicted): a prediction that never reaches
    the target counts as the run's last epoch + 1; true is inf when the run
    itself never reaches it."""
    true = read(accuracy, epochs, target)
    return true, min(read(predicted, epochs, target), float(np.max(epochs)) + 1)
