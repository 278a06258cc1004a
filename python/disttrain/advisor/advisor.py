"""``Advisor``: the public face of the advisor (fit, predict, curves, recommend, save/load)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from ._threads import one_blas_thread
from .baseline import RawColumnsBaseline
from .curve_model import LearningCurveModel
from .errors import AdvisorInputError
from .hardware import DEFAULT_PRICES, GPU_TFLOPS, has_data_sheet
from .loading import REFERENCE_DATASET, fold_ranks, load_raw, normalize_configs, runs_table
from .recommend import Recommendation, rank
from .time_model import EpochTimeModel, refused


class Advisor:
    """Predicts time per epoch and accuracy per epoch of a training
    configuration, and recommends the cheapest configuration for a target.

    Build one with :meth:`fit` or :meth:`load`.

    Example::

        >>> from disttrain.advisor import Advisor
        >>> advisor = Advisor.fit()                       # the default epoch logs
        >>> advisor.recommend("resnet50", target_acc=0.75).table.head(3)
    """

    # The layout of a fitted advisor's attributes: a saved one of another layout cannot predict
    # (an attribute its code added or renamed since is missing). Raised when that layout changes.
    FORMAT = 2

    def __init__(self, time_model: EpochTimeModel, curve_model: LearningCurveModel, runs: pd.DataFrame):
        self.format = self.FORMAT
        self.time_model = time_model
        self.curve_model = curve_model
        self.runs = runs
        # Models it can recommend for: those with runs on the logs' data set (accuracy is learnt
        # there). Time per epoch is predicted for any family and model the runs hold.
        self.known_models = set(runs.loc[runs["dataset"] == REFERENCE_DATASET, "model_name"])
        self.known_families = set(runs["gpu_family"])
        self.max_acc = float(curve_model.max_acc_)

    @classmethod
    @one_blas_thread
    def fit(cls, paths_or_dataframe=None, coverage: float = 0.8, cache: bool = False) -> "Advisor":
        """Fits both models on epoch logs.

        Args:
            paths_or_dataframe: None (the default epoch logs, see
                loading.default_data_path), CSV files or folders (epoch logs or
                CSVs written by the disttrain trainer), or a data frame in the
                logs' columns.
            coverage: two-sided coverage of every interval.
            cache: reuse the fit of the same files from the advisor's cache
                (and store this one there); see advisor.cache. A data frame is
                always fitted.

        Returns:
            a fitted Advisor.
        """
        if not 0 < coverage < 1:
            raise AdvisorInputError(f"coverage {coverage}: give a fraction between 0 and 1, such as 0.8")
        if cache and not isinstance(paths_or_dataframe, pd.DataFrame):
            from .cache import cached_fit

            return cached_fit(paths_or_dataframe, coverage)[0]
        raw = load_raw(paths_or_dataframe)
        epochs = fold_ranks(raw)
        runs = runs_table(epochs)
        # Every run teaches the time model (its data set's size is a feature); accuracy curves
        # are learnt on the logs' data set only (CIFAR-10): a run of the trainer on its digits
        # data set reaches 0.9 in a few epochs, which says nothing of a ResNet on CIFAR-10.
        reference = raw["dataset"] == REFERENCE_DATASET
        if not reference.any():
            raise AdvisorInputError(f"no run on {REFERENCE_DATASET} among the training data: the accuracy model "
                                    f"learns from those (leave out --no-default-logs to include the shipped logs)")
        # test_acc is optional in a file: without any, LightGBM's row model failed ('non empty').
        if not raw.loc[reference, "test_acc"].notna().any():
            raise AdvisorInputError(f"no test_acc among the {REFERENCE_DATASET} runs of the training data: need at "
                                    f"least 3 runs with test_acc to fit learning curves")
        curve_model = LearningCurveModel(coverage).fit(epochs[epochs["dataset"] == REFERENCE_DATASET],
                                                       rows=RawColumnsBaseline(time=False).fit(raw[reference]))
        return cls(EpochTimeModel(coverage).fit(runs), curve_model, runs)

    @staticmethod
    def normalize(configs: pd.DataFrame) -> pd.DataFrame:
        """Completes configuration columns with the logs' defaults (see loading)."""
        return normalize_configs(configs).reset_index(drop=True)

    def predict(self, configs: pd.DataFrame) -> pd.DataFrame:
        """Time per epoch for each configuration.

        Args:
            configs: data frame in the logs' column names; needs ``model_name``,
                ``gpu``, ``batch_size``; ``num_of_gpus``, ``distribute_data`` and
                the rest are optional.

        Returns:
            DataFrame with one row per configuration: ``epoch_time_s``,
            ``epoch_time_s_low``, ``epoch_time_s_high``, the physical terms
            ``load_s``, ``compute_s``, ``comm_s``, and whether each input lies
            inside what the training runs cover (``in_logs_workers``,
            ``in_logs_batch_size``, ``in_logs_num_of_gpus``, ``in_logs_gpu``,
            ``in_logs_model``; ``outside_logs`` names those outside). Outside,
            the time is the physical terms alone, with a wider interval.
        """
        if not isinstance(configs, pd.DataFrame):
            raise AdvisorInputError(f"configs: give a data frame, one row per configuration (not {type(configs).__name__})")
        if configs.empty:
            raise AdvisorInputError("configs: no rows: nothing to predict")
        normalized = self.normalize(configs)
        # A GPU family without logs is predicted from its data-sheet speed, flagged (see
        # time_model); the CPU, or a GPU outside the table, has no data sheet on that scale: its
        # runs, or a calibration.
        unlogged = self.regime_unlogged(normalized)
        unknown = sorted(set(normalized.loc[unlogged, "gpu_family"]) - self.known_families)
        if unknown:
            raise AdvisorInputError(f"no epoch logs for GPU {', '.join(unknown)}: add runs on it with --data, or "
                                    f"measure it with --calibrate (known: {', '.join(sorted(self.known_families))}; "
                                    f"from data sheets: {', '.join(f for f in GPU_TFLOPS if has_data_sheet(f))})")
        if unlogged.any():  # a device its runs teach, in the other regime
            row = normalized[unlogged].iloc[0]
            kind = "several processes (distributed)" if row["is_distributed"] else "one process"
            raise AdvisorInputError(f"no epoch logs for GPU {row['gpu_family']} on {kind}: add such a run with "
                                    f"--data, or measure it with --calibrate")
        return self.time_model.predict(normalized).set_index(configs.index)

    def regime_unlogged(self, normalized: pd.DataFrame) -> np.ndarray:
        """Per configuration (normalized), whether predict refuses it for want of runs on its
        device without a data sheet in its execution regime (time_model.refused); a
        recommendation leaves such candidates out."""
        return refused(self.time_model.runs_, normalized)

    @one_blas_thread
    def accuracy_curve(self, config, epochs=100, observed=None) -> pd.DataFrame:
        """Predicted test accuracy per epoch, with an interval.

        Args:
            config: a dict or Series of configuration columns.
            epochs: number of epochs (curve at 1..epochs) or the epochs themselves.
            observed: optional test accuracies of the job's first epochs; the
                curve is conditioned on them.

        Returns:
            DataFrame with ``epoch``, ``accuracy``, ``accuracy_low``, ``accuracy_high``.
        """
        try:
            config = dict(config)
        except (TypeError, ValueError):
            raise AdvisorInputError(f"config: give a dict or Series of configuration columns "
                                    f"(not {type(config).__name__})") from None
        frame = self.normalize(pd.DataFrame([config]))
        if frame.loc[0, "milestones"] == "":
            frame.loc[0, "milestones"] = "60,80"
        wrong = AdvisorInputError(f"epochs {epochs!r}: give a number of epochs (at least 1) or epochs from 1 on")
        try:
            # The ignore: np.isscalar narrows `epochs` to numpy's scalar union, complex included, which int() does not take
            grid = np.arange(1, int(epochs) + 1) if np.isscalar(epochs) else np.asarray(epochs)  # type: ignore[arg-type]
            finite = np.isfinite(grid.astype(float))
            if np.isscalar(epochs) and float(epochs) != int(epochs):  # type: ignore[arg-type]
                raise ValueError  # 2.5 epochs was the curve at 1 and 2
        except (TypeError, ValueError, OverflowError):  # NaN, infinite or not a number
            raise wrong from None
        if grid.size == 0 or grid.ndim != 1 or not np.all(finite) or grid.min() < 1:
            raise wrong
        if observed is not None:
            # Fractions, as test_acc is: a 1-D sequence in [0, 1] (percentages gave a curve near 0.95,
            # a scalar or a 2-D list a TypeError or a ValueError from inside SciPy).
            try:
                values = np.asarray(observed, dtype=float)
            except (TypeError, ValueError):
                values = None
            if values is None or values.ndim != 1 or not np.all((values >= 0) & (values <= 1)):
                raise AdvisorInputError("observed: give the job's test accuracies so far, a list of fractions "
                                        "from 0 to 1 (such as 0.42), one per epoch")
        if np.isnan(frame.loc[0, "num_epochs"]):
            frame.loc[0, "num_epochs"] = grid.max() + 1
        return self.curve_model.predict_curve(frame.iloc[0], grid, observed=observed)

    @one_blas_thread
    def recommend(self, model_name: str, target_acc: float, prices: dict | None = None, gpus=None,
                  deadline_hours: float | None = None, gpu_counts=(1, 2, 3, 4),
                  batch_sizes=(32, 128, 512), max_epochs: int = 100) -> Recommendation:
        """Ranks configurations by predicted cost to reach ``target_acc``.

        Args:
            model_name: e.g. ``"resnet50"``.
            target_acc: test accuracy to reach, in (0, 1].
            prices: GPU family -> price per GPU-hour (default hardware.DEFAULT_PRICES).
            gpus: GPU families to consider (default: every priced family with logs).
            deadline_hours: drop configurations predicted to take longer.
            gpu_counts, batch_sizes: the grid of candidates.
            max_epochs: the longest run considered (the logs' recipe is 100).

        Returns:
            Recommendation: ``table`` (ranked, with intervals) and ``message``;
            ``out_of_reach`` is True when no candidate gets there (in time).
        """
        return rank(self, model_name, target_acc, dict(DEFAULT_PRICES if prices is None else prices), gpus=gpus,
                    deadline_hours=deadline_hours, gpu_counts=gpu_counts, batch_sizes=batch_sizes,
                    max_epochs=max_epochs)

    def save(self, path) -> None:
        """Writes the fitted advisor to ``path`` (a pickle: load only files you trust)."""
        with open(path, "wb") as f:
            pickle.dump(self, f)

    @staticmethod
    def load(path) -> "Advisor":
        """Reads an advisor written by :meth:`save`."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                advisor = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise AdvisorInputError(f"cannot load advisor from '{path}': {e}") from None
        if not isinstance(advisor, Advisor):
            raise AdvisorInputError(f"'{path}' does not hold an Advisor")
        if getattr(advisor, "format", None) != Advisor.FORMAT:
            raise AdvisorInputError(f"'{path}' holds an advisor saved by another version of disttrain (format "
                                    f"{getattr(advisor, 'format', 1)}, this one reads {Advisor.FORMAT}): fit it again "
                                    f"(Advisor.fit) and save it")
        return advisor
