"""Time per epoch: a physical model of the epoch, corrected by LightGBM.

The physical part says where the time goes, with a handful of fitted rates:
    compute   samples_per_gpu * params / speed
    launches  steps * depth / sqrt(speed)        (per-step overhead: kernels, Python)
    comm      steps * params * 2(G-1)/G           (ring allreduce bytes per step)
    dist      is_distributed * (compute + depth)  (the DDP jobs' extra cost per sample)
GPU speed starts from the data sheet (hardware.GPU_TFLOPS) and each family seen
in training gets a fitted correction, so an unseen family still has a speed.
Working in samples per GPU is what carries the model to sharded data sets,
which the logs do not contain: sharding divides the samples and the steps.

LightGBM then learns log(measured / physical) from physical features only.
Intervals are split-conformal: quantiles of out-of-fold log residuals from a
cross-validation grouped by configuration, so they price in configurations
the model has not seen.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from sklearn.model_selection import GroupKFold

from .features import boosting_features, derive

_RATES = ["compute", "launch", "comm", "dist_compute", "dist_const"]


class EpochTimeModel:
    """Predicts the training time of one epoch for a configuration.

    Args:
        coverage: two-sided coverage of the prediction interval.
        boosting: whether to add the LightGBM correction (off reproduces the
            physical model alone, for the evaluation).

    Example::

        >>> model = EpochTimeModel().fit(runs)      # runs: loading.runs_table(...)
        >>> model.predict(runs.head(2))[["epoch_time_s", "epoch_time_s_low"]]
    """

    def __init__(self, coverage: float = 0.8, boosting: bool = True):
        self.coverage = coverage
        self.boosting = boosting

    # -- physical part -------------------------------------------------------
    def _arrays(self, configs: pd.DataFrame) -> dict:
        d = derive(configs)
        return {
            "tflops": d["tflops"].to_numpy() / 10,
            "family_index": np.array([self.families_.index(f) if f in self.families_ else -1
                                      for f in d["gpu_family"]]),
            "params": d["params"].to_numpy(dtype=float) / 1e7,
            "gpus": d["num_of_gpus"].to_numpy(dtype=float),
            "dist": d["is_distributed"].to_numpy(dtype=float),
            "depth": d["depth"].to_numpy(dtype=float) / 10,
            "steps": d["steps_per_epoch"].to_numpy(),
            "samples": d["samples_per_gpu"].to_numpy(),
        }

    def _physical(self, theta: np.ndarray, a: dict) -> np.ndarray:
        rates = np.exp(theta[: len(_RATES)])
        # Families unseen in training keep the data-sheet speed (index -1 -> 0).
        adjust = np.append(theta[len(_RATES):], 0.0)[a["family_index"]]
        speed = a["tflops"] * np.exp(adjust)
        compute = a["samples"] * a["params"] / speed / 1e4
        return (rates[0] * compute
                + rates[1] * a["steps"] * a["depth"] / 1e3 / np.sqrt(speed)
                + rates[2] * a["steps"] * a["params"] * 2 * (a["gpus"] - 1) / a["gpus"] / 1e2
                + a["dist"] * (rates[3] * compute + rates[4] * a["depth"]))

    def _fit_core(self, runs: pd.DataFrame):
        families = sorted(runs["gpu_family"].unique())
        self.families_ = families
        a = self._arrays(runs)
        y = runs["epoch_time_s"].to_numpy(dtype=float)
        # soft_l1: a run on a slow or shared node should not bend the rates for all others.
        solution = least_squares(lambda th: np.log(self._physical(th, a) / y),
                                 np.zeros(len(_RATES) + len(families)), loss="soft_l1", f_scale=0.1)
        theta = solution.x
        booster = None
        if self.boosting:
            residual = np.log(y / self._physical(theta, a))
            booster = lgb.LGBMRegressor(n_estimators=60, learning_rate=0.05, num_leaves=4,
                                        min_child_samples=4, verbose=-1, n_jobs=1)
            booster.fit(boosting_features(runs), residual)
        return theta, families, booster

    def _predict_core(self, core, configs: pd.DataFrame) -> np.ndarray:
        theta, families, booster = core
        self.families_ = families
        log_time = np.log(self._physical(theta, self._arrays(configs)))
        if booster is not None:
            log_time = log_time + booster.predict(boosting_features(configs))
        return log_time

    def fit(self, runs: pd.DataFrame) -> "EpochTimeModel":
        """Fits on a runs table (loading.runs_table): one row per run with ``epoch_time_s``.

        Returns:
            self
        """
        groups = runs["config_id"].to_numpy()
        residuals = []
        folds = min(5, len(np.unique(groups)))
        if folds >= 2:
            for train, test in GroupKFold(n_splits=folds).split(runs, groups=groups):
                core = self._fit_core(runs.iloc[train])
                residuals.append(np.log(runs["epoch_time_s"].to_numpy()[test])
                                 - self._predict_core(core, runs.iloc[test]))
        self.core_ = self._fit_core(runs)
        residuals = np.concatenate(residuals) if residuals else np.zeros(1)
        tail = (1 - self.coverage) / 2
        self.log_low_, self.log_high_ = np.quantile(residuals, [tail, 1 - tail])
        self.rates_ = dict(zip(_RATES, np.exp(self.core_[0][: len(_RATES)])))
        return self

    def predict(self, configs: pd.DataFrame) -> pd.DataFrame:
        """Time per epoch with its interval, one row per configuration.

        Returns:
            DataFrame with ``epoch_time_s``, ``epoch_time_s_low``, ``epoch_time_s_high``.
        """
        log_time = self._predict_core(self.core_, configs)
        return pd.DataFrame({
            "epoch_time_s": np.exp(log_time),
            "epoch_time_s_low": np.exp(log_time + self.log_low_),
            "epoch_time_s_high": np.exp(log_time + self.log_high_),
        }, index=configs.index)
