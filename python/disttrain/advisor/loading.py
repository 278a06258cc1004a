"""Loads epoch logs into one tidy table: one row per run and epoch.

Two sources share one schema: the public epoch logs (one CSV per run and rank,
see the data's README) and the CSVs the disttrain trainer writes. Columns are
read by name; only the ones the models need are required.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import AdvisorInputError
from .features import TRAIN_SAMPLES
from .hardware import device_family

ENV_VAR = "DISTTRAIN_EPOCH_LOGS"
REQUIRED = ["epoch_timings", "model_name", "gpu", "batch_size"]

# Parameter counts of the CIFAR-10 (10-class) ResNets. The logs carry the
# 1000-class count for some runs and the 10-class count for others; one count
# per model keeps that bookkeeping difference out of the features.
MODEL_PARAMS = {
    "resnet18": 11_181_642,
    "resnet34": 21_289_802,
    "resnet50": 23_528_522,
    "resnet101": 42_520_650,
}

# Defaults for optional columns: the recipe of the logs' single-GPU runs.
OPTIONAL_DEFAULTS = {
    "test_acc": np.nan,
    "test_timings": np.nan,
    "train_loss": np.nan,
    "num_of_gpus": 1,
    "learning_rate": 0.1,
    "num_workers_data_loader": 4,
    "num_epochs": np.nan,
    "milestones": "",
    "rank": 0,
    "config_index": np.nan,
    "num_of_paramters": np.nan,
    "dataset": "cifar10",
}
# The data set of the logs: the one whose accuracy the advisor learns and recommends for.
REFERENCE_DATASET = "cifar10"

# The largest batch size, GPU count or loader worker count a configuration may name.
_MAX_COUNT = 2**31 - 1


def whole_counts(values: pd.Series, low: int) -> pd.Series:
    """Which ``values`` are counts a configuration may name: whole numbers from ``low`` to
    _MAX_COUNT (NaN is not)."""
    return (values >= low) & (values <= _MAX_COUNT) & (values == np.floor(values))


def count_error(column: str, value, low: int) -> str:
    return f"{column} {value}: give a whole number from {low} to {_MAX_COUNT}"

RUN_KEYS = ["model_name", "gpu", "num_of_gpus", "batch_size", "learning_rate",
            "distribute_data", "num_workers_data_loader", "num_epochs", "milestones", "config_id"]


SHIPPED_LOGS = Path(__file__).resolve().parent / "epoch_logs"


def shipped_logs_path() -> Path:
    """The epoch logs shipped inside the package (``disttrain/advisor/epoch_logs``).

    Raises:
        AdvisorInputError: when this install lacks them.
    """
    if not SHIPPED_LOGS.is_dir():
        raise AdvisorInputError(f"epoch logs not found: this install lacks the shipped logs ({SHIPPED_LOGS}); "
                                f"set {ENV_VAR} or pass --data")
    return SHIPPED_LOGS


def default_data_path() -> Path:
    """The default epoch logs: ``$DISTTRAIN_EPOCH_LOGS`` (a folder or a CSV
    file) when set, which replaces the shipped logs; else the logs shipped in
    the package (:func:`shipped_logs_path`).

    Raises:
        AdvisorInputError: ``$DISTTRAIN_EPOCH_LOGS`` names nothing that exists,
            or the shipped logs are missing.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).exists():
            raise AdvisorInputError(f"{ENV_VAR}={env}: no such file or directory")
        return Path(env)
    return shipped_logs_path()


def data_sources(data=None, default_logs: bool = True) -> list[Path]:
    """The files and folders the command line trains on, by one rule:
    the default logs (:func:`default_data_path`: ``$DISTTRAIN_EPOCH_LOGS``
    if set, else the shipped logs) unless ``default_logs`` is False, plus
    every path in ``data``. A path given twice (or inside the defaults'
    folder) is read once.

    Raises:
        AdvisorInputError: nothing to train on, or a default that is missing.
    """
    paths = [default_data_path()] if default_logs else []
    paths += [Path(p) for p in (data or [])]
    if not paths:
        raise AdvisorInputError("no epoch logs: --no-default-logs needs --data PATH [PATH ...]")
    return paths


def _csv_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(Path(p) for p in glob.glob(str(path / "**" / "*.csv"), recursive=True))
        if not found:  # beside the default logs, a folder of the wrong level added nothing, in silence
            raise AdvisorInputError(f"no CSV files under '{path}' (a trainer's runs folder holds <run>/metrics.csv)")
        return found
    raise AdvisorInputError(f"no such file or directory: '{path}'")


# Files parsed in this process, by their bytes (a file rewritten is parsed again): a notebook, the
# web page and the evaluation's folds load the same logs again and again, and parsing the 126
# shipped files took 0.5-1 s each time (reading their bytes, 10 ms).
_PARSED: dict = {}
_PARSED_MAX = 4096


def _read_one(path: Path) -> pd.DataFrame:
    try:
        data = Path(path).read_bytes()
        key = hashlib.sha256(data).digest()
        frame = _PARSED[key].copy() if key in _PARSED else pd.read_csv(io.BytesIO(data))
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AdvisorInputError(f"cannot read '{path}' as CSV: {str(e).splitlines()[0]}") from None
    if key not in _PARSED:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = frame.copy()
    # The logs' epoch column has no name; the trainer calls it 'epoch'.
    first = frame.columns[0] if len(frame.columns) else None
    if "epoch" not in frame.columns and first is not None and str(first).startswith("Unnamed"):
        frame = frame.rename(columns={first: "epoch"})
    frame["source"] = str(path)
    return frame


_TRUE = ("true", "1", "1.0", "yes")
_FALSE = ("false", "0", "0.0", "no", "nan", "none", "")  # as does an empty cell


def _to_bool(series: pd.Series) -> pd.Series:
    text = series.astype(str).str.strip().str.lower()
    return text.isin(_TRUE)


def _where(frame: pd.DataFrame, bad, default: str = "configuration") -> str:
    """Where the first ``bad`` row came from, for an error message: its ``source`` (the file it
    was read from), else ``default``."""
    return frame.loc[bad, "source"].iloc[0] if "source" in frame.columns else default


def check_values(frame: pd.DataFrame) -> None:
    """The optional configuration columns that are given make sense, whether or not a prediction
    uses them (a calibrated device's prediction uses neither the learning rate nor the
    distributed flags): a learning rate or parameter count is a positive number; is_distributed
    and distribute_data are true or false ('maybe' read as false).

    Raises:
        AdvisorInputError: naming the column, the value and the source (its ``source`` column).
    """
    for column in ("learning_rate", "num_of_paramters"):
        if column in frame.columns:
            value = pd.to_numeric(frame[column], errors="coerce")
            bad = (frame[column].notna() & ~((value > 0) & np.isfinite(value))).to_numpy()
            if bad.any():
                raise AdvisorInputError(f"{_where(frame, bad)}: {column} '{frame.loc[bad, column].iloc[0]}' is not a positive number")
    for column in ("is_distributed", "distribute_data"):
        if column in frame.columns:
            text = frame[column].astype(str).str.strip().str.lower()
            bad = (frame[column].notna() & ~text.isin(_TRUE + _FALSE)).to_numpy()
            if bad.any():
                raise AdvisorInputError(f"{_where(frame, bad)}: {column} '{frame.loc[bad, column].iloc[0]}' is not true or false")


def normalize_configs(frame: pd.DataFrame) -> pd.DataFrame:
    """Checks and completes configuration columns (no measurements needed).

    Fills optional columns with the logs' recipe, and adds ``gpu_family``,
    ``params`` (canonical parameter count) and ``config_id`` (the
    configuration, GPU type excluded).

    Raises:
        AdvisorInputError: a required column is missing, a row without a GPU name, or an unknown model.
    """
    missing = [c for c in ("model_name", "gpu", "batch_size") if c not in frame.columns]
    if missing:
        raise AdvisorInputError(f"configuration lacks column(s) {', '.join(missing)} "
                                f"(have: {', '.join(map(str, frame.columns[:12]))})")
    check_values(frame)
    df = frame.copy()
    for column, default in OPTIONAL_DEFAULTS.items():
        if column not in df.columns:
            df[column] = default
    # An empty cell of an optional column reads as its default, like a missing column: files
    # concatenated from different sources (the logs and a trainer CSV) leave NaN in each other's gaps.
    # Only empty cells: a malformed value still fails the check below.
    empty_gpus = df["num_of_gpus"].isna()
    for column in ["batch_size", "num_of_gpus", "learning_rate", "num_workers_data_loader",
                   "num_epochs", "num_of_paramters", "config_index"]:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    df.loc[empty_gpus, "num_of_gpus"] = OPTIONAL_DEFAULTS["num_of_gpus"]
    bad = ~(df["batch_size"] > 0) | ~(df["num_of_gpus"] >= 1)
    if bad.any():
        where = _where(df, bad)
        raise AdvisorInputError(f"{where}: {int(bad.sum())} row(s) with a missing or non-positive batch_size or num_of_gpus")
    df["num_workers_data_loader"] = df["num_workers_data_loader"].fillna(OPTIONAL_DEFAULTS["num_workers_data_loader"])
    # Counts are whole numbers a process can hold (a GPU count of 1e30 overflowed to a negative
    # int: a NaN prediction); a learning rate or parameter count given is a positive number
    # (check_values: a malformed one was read as the default, or predicted infinite).
    for column, low in (("batch_size", 1), ("num_of_gpus", 1), ("num_workers_data_loader", 0)):
        values = df[column]
        bad = ~whole_counts(values, low)
        if bad.any():
            where = _where(df, bad)
            raise AdvisorInputError(f"{where}: {count_error(column, format(df.loc[bad, column].iloc[0], 'g'), low)}")
    df["learning_rate"] = df["learning_rate"].fillna(OPTIONAL_DEFAULTS["learning_rate"])
    df["model_name"] = df["model_name"].astype(str).str.strip().str.lower()
    # A device outside the table is a family of its own, without a data sheet: its runs teach it
    # (the trainer's runs on an H200 were refused as an unknown GPU); a configuration on it without
    # such runs is refused when predicted (Advisor.predict).
    df["gpu_family"] = df["gpu"].map(device_family)
    if df["gpu_family"].isna().any():
        where = _where(df, df["gpu_family"].isna())
        raise AdvisorInputError(f"{where}: a row whose gpu is missing or not a name (a GPU's, or cpu)")
    df["num_of_gpus"] = df["num_of_gpus"].astype(int)
    dist = _to_bool(df["is_distributed"]) if "is_distributed" in df.columns else pd.Series(False, index=df.index)
    df["is_distributed"] = dist | (df["num_of_gpus"] > 1)
    # Single-process runs have no sampler; they see the whole data set, as a shard of one.
    if "distribute_data" in df.columns:
        sharded = _to_bool(df["distribute_data"]) | df["distribute_data"].isna()
    else:
        sharded = pd.Series(True, index=df.index)
    df["distribute_data"] = sharded | ~df["is_distributed"]
    df["params"] = df["model_name"].map(MODEL_PARAMS).fillna(df["num_of_paramters"])
    if df["params"].isna().any():
        model = df.loc[df["params"].isna(), "model_name"].iloc[0]
        raise AdvisorInputError(f"unknown model '{model}': not a known ResNet ({', '.join(MODEL_PARAMS)}) and no num_of_paramters given")
    # A trainer run without milestones leaves the column empty, which pandas reads as float NaN.
    df["milestones"] = df["milestones"].astype(object).fillna("").astype(str)
    # 'CIFAR-10', 'cifar10' and an empty cell are one data set; the time model needs its size.
    dataset = df["dataset"].fillna(OPTIONAL_DEFAULTS["dataset"]).astype(str).str.lower()
    df["dataset"] = dataset.str.replace(r"[^a-z0-9]", "", regex=True).replace("", OPTIONAL_DEFAULTS["dataset"])
    unknown_data = ~df["dataset"].isin(list(TRAIN_SAMPLES))
    if unknown_data.any():
        where = _where(df, unknown_data)
        raise AdvisorInputError(f"{where}: unknown data set '{df.loc[unknown_data, 'dataset'].iloc[0]}' "
                                f"(known: {', '.join(TRAIN_SAMPLES)}): the time model needs its number of training samples")
    recipe = (df["model_name"] + "|" + df["num_of_gpus"].astype(str) + "|" + df["batch_size"].astype(str)
              + "|" + df["learning_rate"].astype(str) + "|" + df["distribute_data"].astype(str))
    # Another data set is another configuration (the logs' own ids and keys are left as they were).
    recipe = recipe + np.where(df["dataset"] == REFERENCE_DATASET, "", "|" + df["dataset"])
    # A configuration is everything but the GPU type; the logs number them.
    numbered = "cfg" + df["config_index"].fillna(-1).astype(int).astype(str)
    df["config_id"] = np.where(df["config_index"].notna(), numbered, recipe)
    return df


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Checks and normalises a raw epoch-log frame (one row per file row):
    normalize_configs plus the measured columns and a ``run_id``.

    Raises:
        AdvisorInputError: a required column is missing or holds bad values.
    """
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise AdvisorInputError(f"epoch log lacks column(s) {', '.join(missing)} "
                                f"(have: {', '.join(map(str, frame.columns[:12]))})")
    df = normalize_configs(frame)
    if "epoch" not in df.columns:
        df["epoch"] = df.groupby("source").cumcount() if "source" in df.columns else np.arange(len(df))
    given_acc = df["test_acc"].notna()
    raw_acc = df["test_acc"]
    for column in ["epoch_timings", "test_acc", "epoch"]:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    # An infinite epoch ('inf' in a file) was taken as a measurement, as --predict does not.
    bad = ~((df["epoch_timings"] > 0) & np.isfinite(df["epoch_timings"])) | df["epoch"].isna()
    if bad.any():
        where = _where(df, bad, "data frame")
        raise AdvisorInputError(f"{where}: {int(bad.sum())} row(s) with a missing, non-positive or infinite "
                                f"epoch_timings, or no epoch")
    # Accuracy is a fraction: a run logged in percent (85.3) or with junk ('abc', read as empty) was
    # taken, and moved every model's curves and recommendations.
    bad = given_acc & ~((df["test_acc"] >= 0) & (df["test_acc"] <= 1))
    if bad.any():
        where = _where(df, bad, "data frame")
        raise AdvisorInputError(f"{where}: test_acc '{raw_acc[bad].iloc[0]}' is not a fraction from 0 to 1 "
                                f"({int(bad.sum())} row(s))")
    if "source" in df.columns:
        df["num_epochs"] = df["num_epochs"].fillna(df.groupby("source")["epoch"].transform("max") + 1)
    df["num_epochs"] = df["num_epochs"].fillna(df["epoch"].max() + 1)
    key = df["config_id"]
    for column in RUN_KEYS[:-1]:
        key = key + "|" + df[column].astype(str)
    df["run_id"] = key + np.where(df["dataset"] == REFERENCE_DATASET, "", "|" + df["dataset"])
    return df


def load_raw(paths_or_dataframe=None) -> pd.DataFrame:
    """Every row of every file, tidied: the 'random row' view the old baseline used.

    Args:
        paths_or_dataframe: None (the default logs, :func:`default_data_path`),
            a file or folder, a list of them (exactly these: the defaults are
            not added; see :func:`data_sources`), or a data frame already in
            the logs' columns.
    """
    if isinstance(paths_or_dataframe, pd.DataFrame):
        frame = paths_or_dataframe.copy()
        if "source" not in frame.columns:
            frame["source"] = "data frame"
        return tidy(frame)
    frames = []
    for path in csv_files(paths_or_dataframe):
        frame = _read_one(path)
        # Checked per file: concatenated, a file without them read as rows of empty cells, and
        # the error named a missing batch size rather than the columns the file lacks.
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            raise AdvisorInputError(f"{path}: lacks column(s) {', '.join(missing)} "
                                    f"(have: {', '.join(map(str, frame.columns.drop('source')[:12]))})")
        frames.append(frame)
    return tidy(pd.concat(frames, ignore_index=True, sort=False))


def csv_files(paths=None) -> list[Path]:
    """The CSV files :func:`load_raw` reads for ``paths`` (None: the default
    logs; a file or folder; a list of them), resolved, in reading order.

    Raises:
        AdvisorInputError: a path that does not exist, or no CSV file at all.
    """
    if paths is None:
        paths = [default_data_path()]
    elif isinstance(paths, (str, os.PathLike)):
        paths = [Path(paths)]
    else:
        paths = [Path(p) for p in paths]
    # A file reached twice (a folder and a file inside it, the same folder twice) is read once.
    files = list(dict.fromkeys(f.resolve() for p in paths for f in _csv_files(p)))
    if not files:
        raise AdvisorInputError(f"no CSV files under {', '.join(map(str, paths))}")
    return files


def load_epochs(paths_or_dataframe=None) -> pd.DataFrame:
    """One row per run and epoch: the ranks of a distributed run folded into one.

    A step ends when the slowest rank ends, so the epoch time is the ranks'
    maximum; accuracy and loss are the same model on every rank, so their mean.

    Returns:
        DataFrame with the configuration columns, ``run_id``, ``config_id``,
        ``gpu_family``, ``params``, ``epoch`` and the measured columns.

    Example::

        >>> epochs = load_epochs()            # the default epoch logs
        >>> epochs.groupby("run_id").size().min()
        30
    """
    return fold_ranks(load_raw(paths_or_dataframe))


def fold_ranks(raw: pd.DataFrame) -> pd.DataFrame:
    """:func:`load_epochs` of rows :func:`load_raw` has already read and tidied."""
    config_columns = ["run_id", "config_id", "model_name", "gpu", "gpu_family", "params", "num_of_gpus",
                      "batch_size", "learning_rate", "distribute_data", "is_distributed",
                      "num_workers_data_loader", "num_epochs", "milestones", "dataset"]
    grouped = raw.groupby(config_columns + ["epoch"], sort=True, dropna=False)
    epochs = grouped.agg(epoch_timings=("epoch_timings", "max"), test_timings=("test_timings", "max"),
                         test_acc=("test_acc", "mean"), train_loss=("train_loss", "mean")).reset_index()
    return epochs


def runs_table(epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its configuration, its median epoch time and its
    median evaluation-pass time (``test_time_s``, NaN where not logged)."""
    config_columns = [c for c in epochs.columns if c not in
                      ("epoch", "epoch_timings", "test_timings", "test_acc", "train_loss")]
    return epochs.groupby(config_columns, sort=True, dropna=False).agg(
        epoch_time_s=("epoch_timings", "median"), epochs=("epoch", "size"),
        best_acc=("test_acc", "max"), test_time_s=("test_timings", "median")).reset_index()
