"""The earlier model, reproduced: plain LightGBM on the raw columns of every
epoch row (ranks included), as first evaluated on a random row split."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

RAW_FEATURES = ["epoch", "model_name", "num_of_paramters", "gpu", "is_distributed", "num_of_gpus",
                "num_workers_data_loader", "batch_size", "learning_rate", "distribute_data"]


def _matrix(raw: pd.DataFrame) -> pd.DataFrame:
    X = raw[RAW_FEATURES].copy()
    X["num_of_paramters"] = X["num_of_paramters"].fillna(raw["params"])
    for column in ("model_name", "gpu"):
        X[column] = X[column].astype("category")
    for column in ("is_distributed", "distribute_data"):
        X[column] = X[column].astype(float)
    return X


class RawColumnsBaseline:
    """LightGBM (default settings) on raw columns, for time and for accuracy.

    Args:
        time: also fit the time model (the accuracy ensemble of
            curve_model needs only the accuracy one).
    """

    def __init__(self, time: bool = True):
        self.time = time

    def fit(self, raw: pd.DataFrame) -> "RawColumnsBaseline":
        X = _matrix(raw)
        self.categories_ = {c: X[c].cat.categories for c in ("model_name", "gpu")}
        if self.time:
            self.time_ = lgb.LGBMRegressor(verbose=-1, n_jobs=1).fit(X, raw["epoch_timings"])
        known = raw["test_acc"].notna()
        self.acc_ = lgb.LGBMRegressor(verbose=-1, n_jobs=1).fit(X[known], raw.loc[known, "test_acc"])
        # A configuration (not a logged row) lacks the raw columns: it stands
        # for the GPU name its family has most often in the logs, and for the
        # parameter count the logs' runs of its model and regime carry (the
        # single-GPU runs used 1000-class ResNets, the DDP runs 10-class ones).
        self.gpu_names_ = raw.groupby("gpu_family")["gpu"].agg(lambda s: s.mode().iloc[0]).to_dict()
        counted = raw.dropna(subset=["num_of_paramters"])
        self.param_counts_ = counted.groupby(["model_name", "is_distributed"])["num_of_paramters"].agg(
            lambda s: s.mode().iloc[0]).to_dict()
        return self

    def knows(self, rows: pd.DataFrame) -> np.ndarray:
        """Which rows have only categories (model, GPU) the trees saw in training."""
        return np.logical_and.reduce([rows[column].astype(str).isin(categories).to_numpy()
                                      for column, categories in self.categories_.items()])

    def complete(self, configs: pd.DataFrame) -> pd.DataFrame:
        """Configurations (loading's columns) as the raw rows the model was
        trained on: a GPU given by family gets its most common logged name, a
        missing parameter count the one of the model and regime in the logs."""
        out = configs.copy()
        if "num_of_paramters" not in out.columns:
            out["num_of_paramters"] = np.nan
        unknown = ~out["gpu"].astype(str).isin(self.categories_["gpu"])
        out.loc[unknown, "gpu"] = out.loc[unknown, "gpu_family"].map(self.gpu_names_).fillna(out.loc[unknown, "gpu"])
        missing = out["num_of_paramters"].isna()
        if not missing.any():  # assigning [] to no rows of an int64 column is a TypeError in pandas
            return out
        keys = zip(out.loc[missing, "model_name"], out.loc[missing, "is_distributed"].astype(bool))
        out.loc[missing, "num_of_paramters"] = [self.param_counts_.get(k, np.nan) for k in keys]
        return out

    def _aligned(self, raw):
        X = _matrix(raw)
        for column, categories in self.categories_.items():
            values = X[column].astype(str)
            # A category never seen in training is missing to the trees.
            X[column] = pd.Categorical(values.where(values.isin(categories)), categories=categories)
        return X

    def predict_time(self, raw: pd.DataFrame) -> np.ndarray:
        return self.time_.predict(self._aligned(raw))

    def predict_accuracy(self, raw: pd.DataFrame) -> np.ndarray:
        return self.acc_.predict(self._aligned(raw))


def random_split_scores(raw: pd.DataFrame, seed: int = 0) -> dict:
    """The earlier evaluation: 80/20 random split of epoch rows. Returns MAEs."""
    train, test = train_test_split(raw, test_size=0.2, random_state=seed)
    model = RawColumnsBaseline().fit(train)
    known = test["test_acc"].notna()
    return {"time_mae_s": float(np.mean(np.abs(model.predict_time(test) - test["epoch_timings"]))),
            "accuracy_mae": float(np.mean(np.abs(model.predict_accuracy(test[known]) - test.loc[known, "test_acc"])))}
