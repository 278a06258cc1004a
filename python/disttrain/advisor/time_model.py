"""Time per epoch: a physical model of the epoch whose rates are learned per
execution regime, GPU family and model, with shrinkage.

One epoch on one GPU is

    t = load * samples
      + (compute * samples * params + launch * steps * depth) / speed
      + comm * steps * params * 2(G-1)/G          (ring all-reduce bytes per step)

with ``samples`` the samples one GPU processes per epoch (the whole data set,
or a 1/G shard under a DistributedSampler), ``steps`` = samples / batch size,
and ``speed`` the GPU family's data-sheet TFLOPS (hardware.GPU_TFLOPS).

Each rate is fitted separately for the two execution regimes of the logs
(single process, and DDP with its own data-loader setting and training
script): the logs show an epoch of the same model on the same GPU taking 5 to
7 times longer under DDP, which no shared rate can express. On top of the data
sheet, each GPU family gets a learned speed correction (shared, and per
regime), and each model a learned correction of its compute and launch rates;
all corrections are penalised towards zero (ridge-like shrinkage), so a
family or model seen in few configurations borrows from the others, and an
unseen one falls back on its data-sheet speed, parameter count and depth.
For a configuration not in the logs, the model thus combines what the same
model and GPU did in other configurations (other batch sizes, GPU counts) with
how batch size and GPU count act on the other models.

The fit is in log space (the errors that matter are relative), weighted by
the square root of the run's epoch count, with a Cauchy loss: a run on a slow
or shared node (the logs hold one at 4x the time of its twin) must not bend
the rates for all others.

Intervals are split-conformal: quantiles of out-of-fold log residuals from a
cross-validation grouped by configuration, so they price in configurations
the model has not seen.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from sklearn.model_selection import GroupKFold

from .features import derive

_RATES = ["load", "compute", "launch", "comm"]
_REGIMES = 2  # 0: one process, 1: distributed (DDP)
# Penalties on the corrections (a correction of 1 in log space costs as much
# as a 1/penalty relative error on one 100-epoch run).
_PENALTY = 0.2
_START = np.log([2.0, 20.0, 5.0, 0.1])


class EpochTimeModel:
    """Predicts the training time of one epoch for a configuration.

    Args:
        coverage: two-sided coverage of the prediction interval.
        penalty: weight of the shrinkage of the family and model corrections.

    Example::

        >>> model = EpochTimeModel().fit(runs)      # runs: loading.runs_table(...)
        >>> model.predict(runs.head(2))[["epoch_time_s", "epoch_time_s_low"]]
    """

    def __init__(self, coverage: float = 0.8, penalty: float = _PENALTY):
        self.coverage = coverage
        self.penalty = penalty

    # -- the physical model --------------------------------------------------
    @staticmethod
    def _index(values, known: list) -> np.ndarray:
        # Unknown categories map to the last slot, a correction fixed at 0.
        return np.array([known.index(v) if v in known else len(known) for v in values])

    def _arrays(self, configs: pd.DataFrame, families: list, models: list) -> dict:
        d = derive(configs)
        gpus = d["num_of_gpus"].to_numpy(dtype=float)
        return {
            "regime": d["is_distributed"].to_numpy().astype(int),
            "family": self._index(d["gpu_family"], families),
            "model": self._index(d["model_name"], models),
            "log_speed": np.log(d["tflops"].to_numpy(dtype=float) / 10),
            "samples": d["samples_per_gpu"].to_numpy(dtype=float) / 5e4,
            "params": d["params"].to_numpy(dtype=float) / 2e7,
            "steps": d["steps_per_epoch"].to_numpy(dtype=float) / 400,
            "depth": d["depth"].to_numpy(dtype=float) / 50,
            "ring": 2 * (gpus - 1) / gpus,
        }

    @staticmethod
    def _unpack(theta: np.ndarray, n_families: int, n_models: int) -> dict:
        sizes = [("rates", _REGIMES * len(_RATES)), ("family", n_families),
                 ("family_regime", _REGIMES * n_families), ("model_compute", n_models),
                 ("model_launch", n_models), ("model_compute_regime", _REGIMES * n_models),
                 ("family_load", n_families)]
        out, start = {}, 0
        for name, size in sizes:
            out[name] = theta[start:start + size]
            start += size
        return out

    @staticmethod
    def _pad(values: np.ndarray, rows: int = 1) -> np.ndarray:
        """Appends the zero correction of an unknown category (per row)."""
        table = values.reshape(rows, -1)
        return np.hstack([table, np.zeros((rows, 1))])

    def _physical(self, theta: np.ndarray, a: dict, n_families: int, n_models: int) -> np.ndarray:
        p = self._unpack(theta, n_families, n_models)
        rates = p["rates"].reshape(_REGIMES, len(_RATES))[a["regime"]]
        r, f, m = a["regime"], a["family"], a["model"]
        log_speed = (a["log_speed"] + self._pad(p["family"])[0, f]
                     + self._pad(p["family_regime"], _REGIMES)[r, f])
        compute = np.exp(rates[:, 1] + self._pad(p["model_compute"])[0, m]
                         + self._pad(p["model_compute_regime"], _REGIMES)[r, m]) * a["samples"] * a["params"]
        launch = np.exp(rates[:, 2] + self._pad(p["model_launch"])[0, m]) * a["steps"] * a["depth"]
        comm = np.exp(np.minimum(rates[:, 3], 5.0)) * a["steps"] * a["params"] * a["ring"]
        load = np.exp(rates[:, 0] + self._pad(p["family_load"])[0, f]) * a["samples"]
        return load + np.exp(-log_speed) * (compute + launch) + comm

    def _fit_core(self, runs: pd.DataFrame):
        families = sorted(runs["gpu_family"].unique())
        models = sorted(runs["model_name"].unique())
        nf, nm = len(families), len(models)
        a = self._arrays(runs, families, models)
        y = runs["epoch_time_s"].to_numpy(dtype=float)
        epochs = runs["epochs"].to_numpy(dtype=float) if "epochs" in runs.columns else np.full(len(runs), 100.0)
        weight = np.sqrt(np.clip(epochs, 1, None) / 100)
        n_rates = _REGIMES * len(_RATES)

        def residual(theta):
            fit = weight * np.log(self._physical(theta, a, nf, nm) / y)
            return np.concatenate([fit, self.penalty * theta[n_rates:]])

        n = n_rates + nf * (2 + _REGIMES) + nm * (2 + _REGIMES)
        theta0 = np.zeros(n)
        theta0[:n_rates] = np.tile(_START, _REGIMES)
        theta = least_squares(residual, theta0, loss="cauchy", f_scale=0.1).x
        return theta, families, models

    def _predict_core(self, core, configs: pd.DataFrame) -> np.ndarray:
        theta, families, models = core
        a = self._arrays(configs, families, models)
        return np.log(self._physical(theta, a, len(families), len(models)))

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
        rates = self.core_[0][: _REGIMES * len(_RATES)].reshape(_REGIMES, len(_RATES))
        self.rates_ = {regime: dict(zip(_RATES, np.exp(row))) for regime, row in zip(("single", "distributed"), rates)}
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
