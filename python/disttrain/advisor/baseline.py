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
    """LightGBM (default settings) on raw columns, for time and for accuracy."""

    def fit(self, raw: pd.DataFrame) -> "RawColumnsBaseline":
        X = _matrix(raw)
        self.categories_ = {c: X[c].cat.categories for c in ("model_name", "gpu")}
        self.time_ = lgb.LGBMRegressor(verbose=-1, n_jobs=1).fit(X, raw["epoch_timings"])
        known = raw["test_acc"].notna()
        self.acc_ = lgb.LGBMRegressor(verbose=-1, n_jobs=1).fit(X[known], raw.loc[known, "test_acc"])
        return self

    def _aligned(self, raw):
        X = _matrix(raw)
        for column, categories in self.categories_.items():
            X[column] = pd.Categorical(X[column].astype(str), categories=categories)
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
