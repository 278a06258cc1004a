"""Configuration -> the quantities the models reason with.

Shared by the time and the accuracy model so both read a configuration the
same way: how many samples one GPU processes per epoch (the whole data set,
or a 1/N shard under a DistributedSampler), how many optimizer steps that is,
the global batch, and the GPU's speed.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from .hardware import GPU_TFLOPS

CIFAR10_TRAIN_SAMPLES = 50_000


def model_depth(model_name: pd.Series) -> np.ndarray:
    """Layer count read from the name ('resnet50' -> 50): kernel launches per
    step grow with depth, not with parameters."""
    digits = model_name.astype(str).str.extract(r"(\d+)")[0].astype(float)
    return digits.fillna(50.0).to_numpy()


def derive(configs: pd.DataFrame) -> pd.DataFrame:
    """Adds ``samples_per_gpu``, ``steps_per_epoch``, ``global_batch``,
    ``depth`` and ``tflops`` to a frame of configurations (loading's columns)."""
    out = configs.copy()
    gpus = out["num_of_gpus"].astype(float).to_numpy()
    batch = out["batch_size"].astype(float).to_numpy()
    sharded = out["distribute_data"].astype(bool).to_numpy()
    out["samples_per_gpu"] = np.where(sharded, CIFAR10_TRAIN_SAMPLES / gpus, CIFAR10_TRAIN_SAMPLES)
    out["steps_per_epoch"] = np.ceil(out["samples_per_gpu"] / batch)
    out["global_batch"] = batch * gpus
    out["depth"] = model_depth(out["model_name"])
    out["tflops"] = out["gpu_family"].map(GPU_TFLOPS).astype(float)
    return out


def boosting_features(configs: pd.DataFrame) -> pd.DataFrame:
    """Numeric features for the LightGBM parts: physical quantities only, no
    identities, so that a tree split means the same on an unseen configuration."""
    d = derive(configs)
    return pd.DataFrame({
        "log_params": np.log(d["params"].astype(float)),
        "log_batch": np.log(d["batch_size"].astype(float)),
        "log_tflops": np.log(d["tflops"]),
        "num_of_gpus": d["num_of_gpus"].astype(float),
        "is_distributed": d["is_distributed"].astype(float),
        "distribute_data": d["distribute_data"].astype(float),
    }, index=configs.index)
