"""Configuration -> the quantities the models reason with.

Shared by the time and the accuracy model so both read a configuration the
same way: how many samples one GPU processes per epoch (the whole data set,
or a 1/N shard under a DistributedSampler), how many optimizer steps that is,
the global batch, and the GPU's speed.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from .hardware import GPU_TFLOPS, NOMINAL_TFLOPS

CIFAR10_TRAIN_SAMPLES = 50_000
# Training samples per epoch of each data set a run may name (``dataset``): CIFAR-10's
# training split (the logs), and the digits training split of `disttrain train`
# (scikit-learn's 1,797 digits less the 20% test split: disttrain.data.digits).
TRAIN_SAMPLES = {"cifar10": CIFAR10_TRAIN_SAMPLES, "digits": 1_797 - int(1_797 * 0.2)}


# Residual blocks of the standard ResNets (He et al., 2016, table 1).
RESNET_BLOCKS = {18: 8, 34: 16, 50: 16, 101: 33, 152: 50}


def model_depth(model_name: pd.Series) -> np.ndarray:
    """Launch depth of a model, in layers: the residual blocks of the ResNet
    named ('resnet34' -> 16 blocks), scaled to layers (x 50/16, so resnet50 ->
    50). Kernel launches and framework work per step grow with the modules a
    step runs through, not with parameters: resnet34 and resnet50 both have 16
    blocks and pay about the same per step, though resnet50 has half again
    as many convolutions. An unknown depth n counts as n/3 blocks."""
    # Per distinct name (a frame of epoch rows repeats a few names thousands of times).
    names, where = np.unique(model_name.astype(str).to_numpy(), return_inverse=True)
    digits = pd.Series(names).str.extract(r"(\d+)")[0].astype(float).fillna(50.0)
    blocks = digits.map(lambda n: RESNET_BLOCKS.get(int(n), n / 3)).to_numpy(dtype=float)
    return blocks[where.reshape(-1)] * 50 / 16


def derive(configs: pd.DataFrame) -> pd.DataFrame:
    """Adds ``samples_per_gpu``, ``steps_per_epoch``, ``global_batch``,
    ``depth`` and ``tflops`` to a frame of configurations (loading's columns;
    without a ``dataset`` column, CIFAR-10)."""
    out = configs.copy()
    gpus = out["num_of_gpus"].astype(float).to_numpy()
    batch = out["batch_size"].astype(float).to_numpy()
    sharded = out["distribute_data"].astype(bool).to_numpy()
    samples = (out["dataset"].map(TRAIN_SAMPLES).to_numpy(dtype=float) if "dataset" in out.columns
               else np.full(len(out), float(CIFAR10_TRAIN_SAMPLES)))
    out["samples_per_gpu"] = np.where(sharded, samples / gpus, samples)
    out["steps_per_epoch"] = np.ceil(out["samples_per_gpu"] / batch)
    out["global_batch"] = batch * gpus
    out["depth"] = model_depth(out["model_name"])
    out["tflops"] = out["gpu_family"].map(GPU_TFLOPS).astype(float).fillna(NOMINAL_TFLOPS)  # outside the table: nominal
    return out
