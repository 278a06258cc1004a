"""``disttrain advise``: recommend, evaluate or serve.

    disttrain advise --model resnet50 --target-acc 0.75 [--gpus P40 V100-SXM2]
                     [--prices prices.csv] [--deadline-hours H] [--json]
    disttrain advise --evaluate [--max-folds K] [--json]
    disttrain advise --serve [--port P]
    disttrain advise --calibrate [--device cpu|cuda]     # measure this machine (advisor.calibrate)
    disttrain advise --predict runs/x/metrics.csv [...]  # time per epoch of the runs' configurations

Training data, one rule for every mode: the default logs (``$DISTTRAIN_EPOCH_LOGS``
if set, else the logs shipped in the package) plus every ``--data`` path;
``--no-default-logs`` leaves the defaults out, so ``--data`` alone is used.
A fit is cached (advisor.cache: keyed by the training files' bytes, the
advisor's code and its libraries' versions); ``--no-cache`` fits again.

Bad input, or a missing optional dependency (``pip install 'disttrain[advisor]'``),
prints one line on stderr and exits with status 2; a target that no
configuration reaches (in time) prints why and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import AdvisorInputError

RESULTS_CSV = Path("benchmarks") / "results" / "advisor_evaluation.csv"
QUICK_RESULTS_CSV = Path("benchmarks") / "results" / "advisor_evaluation_quick.csv"


class _UsageError(Exception):
    """A command line argparse rejects: reported as one line, like any other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage, then exits; one line instead
        raise _UsageError(f"{message} (see disttrain advise --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="disttrain advise", description="training-cost advisor (docs/advisor.md)")
    p.add_argument("--model", help="resnet18 | resnet34 | resnet50 | resnet101")
    p.add_argument("--target-acc", type=float, help="test accuracy to reach, e.g. 0.75")
    p.add_argument("--gpus", nargs="+", help="GPU families to consider (default: all with logs and a price)")
    p.add_argument("--prices", help="CSV with columns gpu,price_per_gpu_hour")
    p.add_argument("--deadline-hours", type=float, metavar="H",
                   help="keep the configurations that finish within H hours (default, or inf: no deadline)")
    p.add_argument("--top", type=int, help="rows of the ranked table to print (default 10)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="epoch-log or trainer CSVs, or folders of them, added to the default logs "
                        "($DISTTRAIN_EPOCH_LOGS if set, else the logs shipped with disttrain)")
    p.add_argument("--no-default-logs", action="store_true",
                   help="train on the --data paths only (leave out $DISTTRAIN_EPOCH_LOGS / the shipped logs)")
    p.add_argument("--no-cache", action="store_true",
                   help="fit again even when the same fit is cached ($DISTTRAIN_ADVISOR_CACHE, else "
                        "~/.cache/disttrain/advisor; 'off' disables the cache)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--evaluate", action="store_true", help=f"run the evaluation, also write {RESULTS_CSV}")
    p.add_argument("--max-folds", type=int, metavar="K",
                   help=f"with --evaluate: at most K folds per split (grouped as before), for a quicker, coarser "
                        f"look; writes {QUICK_RESULTS_CSV}")
    p.add_argument("--serve", action="store_true", help="serve the web page")
    p.add_argument("--calibrate", action="store_true",
                   help="measure a few training steps on this machine (reference models) and keep the result; "
                        "later predictions for this device use it")
    p.add_argument("--device", choices=("cpu", "cuda"), help="with --calibrate: the device (default: cuda if available)")
    p.add_argument("--predict", nargs="+", metavar="CSV",
                   help="predict the time per epoch of the configurations in these CSVs (a trainer's metrics.csv, or "
                        "rows in the logs' columns); a device calibrated here is predicted from its measurement")
    p.add_argument("--host", help="with --serve: the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="with --serve: the port (default 8765; 0: any free port)")
    return p


# Each mode and the options that belong to it alone (the training-data options and --json, --no-cache
# belong to every mode). Given to another mode they were ignored: --serve --calibrate served and
# never calibrated, --evaluate --prices ranked nothing.
_MODES = {"--serve": ("serve", ("host", "port")),
          "--evaluate": ("evaluate", ("max_folds",)),
          "--calibrate": ("calibrate", ("device",)),
          "--predict": ("predict", ()),
          "--model/--target-acc": (None, ("model", "target_acc", "gpus", "prices", "deadline_hours", "top"))}


def _mode(args) -> str:
    """The one mode the command line asks for (its flag as written), refusing two modes at once and an
    option of one mode given to another."""
    recommend = args.model is not None or args.target_acc is not None
    chosen = [flag for flag, (attr, _) in _MODES.items() if (getattr(args, attr) if attr else recommend)]
    if len(chosen) > 1:
        raise AdvisorInputError(f"{' and '.join(chosen)}: give one of --serve, --evaluate, --calibrate, --predict "
                                f"or a recommendation (--model, --target-acc) at a time")
    mode = chosen[0] if chosen else "--model/--target-acc"
    for flag, (_, options) in _MODES.items():
        if flag != mode:
            given = [o for o in options if getattr(args, o) not in (None, [])]
            if given:
                what = "a recommendation" if mode == "--model/--target-acc" else mode
                raise AdvisorInputError(f"--{given[0].replace('_', '-')} belongs to {flag}, not to {what}")
    return mode


def _sources(args) -> list:
    from .loading import data_sources

    return data_sources(args.data, default_logs=not args.no_default_logs)


def _recommend(args) -> int:
    from .advisor import Advisor
    from .hardware import DEFAULT_PRICES, device_family, read_prices
    from .recommend import display_table

    if not args.model or args.target_acc is None:
        raise AdvisorInputError("give --model and --target-acc (or --evaluate, --serve, --calibrate, --predict)")
    if args.deadline_hours is not None and not 0 < args.deadline_hours <= float("inf"):
        raise AdvisorInputError(f"--deadline-hours {args.deadline_hours}: give a positive number of hours (inf: none)")
    top = 10 if args.top is None else args.top
    if top < 1:
        raise AdvisorInputError(f"--top {top}: give at least 1 row")
    read_notes: list[str] = []
    prices = read_prices(args.prices, read_notes) if args.prices else dict(DEFAULT_PRICES)
    gpus = None
    if args.gpus:
        gpus = []
        for name in args.gpus:
            family = device_family(name)  # one outside the table too: recommend says what it lacks
            if family is None:
                raise AdvisorInputError(f"--gpus '{name}': give a GPU's name")
            gpus.append(family)
    advisor = Advisor.fit(_sources(args), cache=not args.no_cache)
    rec = advisor.recommend(args.model.lower(), args.target_acc, prices=prices, gpus=gpus,
                            deadline_hours=args.deadline_hours)
    rec.notes[:0] = read_notes
    if args.json:
        print(json.dumps(rec.to_dict(), indent=1, default=float))
    else:
        for note in rec.notes:
            print(f"disttrain advise: note: {note}", file=sys.stderr)
        print(rec.message)
        if not rec.table.empty:
            print(display_table(rec, top).to_string(index=False))
            print(f"(epochs_to_target: where the median predicted curve reaches the target; epochs_80pct_sure: "
                  f"by which epoch 80% of the predicted curves have; cost in {rec.units['cost']} for the GPUs x hours; "
                  f"data_split_across_gpus: each GPU trains on its share of the data, '-' for one GPU; outside_logs: "
                  f"inputs the training runs do not cover, where the time comes from the physical terms alone)")
    return 1 if rec.out_of_reach else 0


def _fold_progress(split: str, done: int, folds: int) -> None:
    """Progress on stderr: a fold counter on a terminal, a line per split otherwise."""
    if sys.stderr.isatty():
        print(f"\r  split {split}: fold {done}/{folds}", end="\n" if done == folds else "", file=sys.stderr, flush=True)
    elif done == folds:
        print(f"  split {split}: {folds} folds done", file=sys.stderr, flush=True)


def _finite_or_none(value):
    """``value`` with every NaN or infinite number (in dicts and lists, NumPy's included) as None."""
    if isinstance(value, dict):
        return {key: _finite_or_none(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _evaluate(args) -> int:
    from .evaluation import SPLITS, evaluate

    if args.max_folds is not None and args.max_folds < 2:
        raise AdvisorInputError(f"--max-folds {args.max_folds}: give at least 2")
    # A capped evaluation is coarser than the committed one: it never overwrites that one's CSV.
    results_csv = RESULTS_CSV if args.max_folds is None else QUICK_RESULTS_CSV
    print(f"disttrain advise: evaluating on splits {', '.join(SPLITS)} (about 2 min on 2 cores)"
          + (f", at most {args.max_folds} folds per split" if args.max_folds else ""), file=sys.stderr)
    result = evaluate(_sources(args), progress=_fold_progress, max_folds=args.max_folds)
    summary = result["summary"]
    try:
        results_csv.parent.mkdir(parents=True, exist_ok=True)
        summary.to_csv(results_csv, index=False)
        written = None
    except OSError as e:  # a read-only folder, a full disk: the tables are still printed, then this
        written = f"{results_csv} not written: {e.strerror or e} (run from a folder where it can be)"
    if args.json:
        # The baseline has no intervals (NaN columns): NaN and infinities are null, never bare NaN (not JSON).
        print(json.dumps(_finite_or_none({"summary": summary.to_dict(orient="records"),
                                          "random_split_baseline": result["random_split"]}),
                         indent=1, default=float, allow_nan=False))
        if written:
            print(f"disttrain advise: {written}", file=sys.stderr)
        return 0 if written is None else 1
    rs = result["random_split"]
    print(f"baseline on a random row split (its original evaluation): time MAE {rs['time_mae_s']:.2f} s, "
          f"accuracy MAE {rs['accuracy_mae']:.3f}")
    time_columns = ["split", "method", "time_mae_s", "time_rmse_s", "time_mape_pct", "time_interval_coverage_pct",
                    "time_interval_high_over_low"]
    acc_columns = ["split", "method", "accuracy_mae", "epochs_to_target_median_err", "epochs_to_target_mean_err",
                   "epochs_to_target_median_err_frac", "epochs_to_target_closer", "epochs_to_target_cases",
                   "regret_median_pct", "regret_mean_pct", "regret_infeasible", "regret_cases"]
    print("\ntime per epoch (out of fold, every epoch row)")
    print(summary[time_columns].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\naccuracy, epochs to target (0.5..0.8) and regret of the recommendation")
    print(summary[acc_columns].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if written:
        print(f"disttrain advise: {written}", file=sys.stderr)
        return 1
    if args.max_folds is None:
        print(f"\nwritten: {results_csv} (in a checkout, refresh docs/advisor_results.md with "
              f"'python -m disttrain.advisor.results_page')")
    else:
        print(f"\nwritten: {results_csv} (at most {args.max_folds} folds per split: not the committed evaluation)")
    return 0


def _speed_scale(args):
    """f(model, batch) -> the fitted compute term of that ResNet on the logs' P40, in seconds per
    epoch times the P40's TFLOPS: a measured epoch of t seconds is then f / t TFLOPS on that scale."""
    import pandas as pd

    from .advisor import Advisor
    from .hardware import GPU_TFLOPS

    advisor = Advisor.fit(_sources(args), cache=not args.no_cache)
    if "P40" not in advisor.known_families:
        return None

    def scale(model: str, batch: int) -> float:
        config = pd.DataFrame([{"model_name": model, "gpu": "P40", "batch_size": batch, "num_workers_data_loader": 4}])
        return float(advisor.predict(config)["compute_s"].iloc[0]) * GPU_TFLOPS["P40"]
    return scale


def _calibrate(args) -> int:
    import pandas as pd

    from . import calibrate

    device = calibrate.this_device(args.device)
    print(f"disttrain advise: calibrating on {calibrate.device_name(device)} (a few training steps of "
          f"{', '.join(f'{m}/{d}/b{b}' for m, d, b in calibrate.REFERENCE)})", file=sys.stderr)
    result = calibrate.calibrate(device, speed_scale=_speed_scale(args))
    path = calibrate.store(result)
    if args.json:
        print(json.dumps({**asdict(result), "stored": str(path) if path else None}, indent=1))
        return 0
    print(pd.DataFrame(result.timings).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if result.equivalent_tflops is not None:
        print(f"on the logs' speed scale (ResNet-18, batch {calibrate.REFERENCE[2][2]}): about {result.equivalent_tflops:.2f} FP32 TFLOPS "
              f"(P40 11.8, V100-SXM2 15.7)")
    if path:
        print(f"stored: {path}")
    else:
        from .cache import cache_dir

        folder = cache_dir()
        # A folder that exists but cannot be used (a file, another user's, writable by others, read-only)
        # was reported as 'the cache is off', and --predict then asked for --calibrate again.
        print("not stored: the advisor's cache is off ($DISTTRAIN_ADVISOR_CACHE)" if folder is None else
              f"not stored: the cache folder '{folder}' is not usable (it must be a folder this user owns, can "
              f"write and nobody else can write; see $DISTTRAIN_ADVISOR_CACHE): --predict will not find this calibration")
    return 0


_CONFIG_COLUMNS = ["model_name", "gpu", "dataset", "batch_size", "num_workers_data_loader", "num_of_gpus",
                   "num_of_nodes", "distribute_data", "is_distributed", "learning_rate", "num_of_paramters"]


def _predict(args) -> int:
    """Time per epoch of each configuration in the --predict CSVs: measured by this machine's
    calibration where the configuration's device is one calibrated here, else the fitted advisor."""
    import pandas as pd

    from . import calibrate
    from .loading import _read_one, check_values, csv_files

    frames = []
    for path in csv_files(args.predict):
        frame = _read_one(path)
        missing = [c for c in ("model_name", "gpu", "batch_size") if c not in frame.columns]
        if missing:
            raise AdvisorInputError(f"{path}: lacks column(s) {', '.join(missing)}")
        if frame.empty:
            raise AdvisorInputError(f"{path}: no rows (a header alone): nothing to predict")
        columns = [c for c in _CONFIG_COLUMNS if c in frame.columns]
        measured = "epoch_timings" in frame.columns
        if measured:
            # An empty cell is an epoch not measured; a value is an epoch's seconds (a NaN, infinite,
            # zero or negative one was shown as the measured median, or moved it).
            timings = pd.to_numeric(frame["epoch_timings"], errors="coerce")
            bad = frame["epoch_timings"].notna() & ~((timings > 0) & np.isfinite(timings))
            if bad.any():
                raise AdvisorInputError(f"{path}: epoch_timings '{frame.loc[bad, 'epoch_timings'].iloc[0]}' is not a "
                                        f"positive number of seconds ({int(bad.sum())} row(s))")
            frame = frame.assign(epoch_timings=timings)
        grouped = frame.assign(_measured=frame["epoch_timings"] if measured else np.nan).groupby(
            columns, dropna=False, sort=False)["_measured"].median().reset_index()
        frames.append(grouped.rename(columns={"_measured": "measured_s"}))
    configs = pd.concat(frames, ignore_index=True)
    check_values(configs)  # the calibrated rows too, which use neither the learning rate nor the flags
    out = configs.copy()
    out["source"] = "logs"
    for column in ("epoch_time_s", "epoch_time_s_low", "epoch_time_s_high"):
        out[column] = np.nan
    out["outside_logs"] = ""
    calibrations = {gpu: calibrate.load(str(gpu)) for gpu in configs["gpu"].astype(str).unique()}
    mine = configs["gpu"].astype(str).map(lambda g: calibrations[g] is not None).to_numpy()
    for gpu, calibration in calibrations.items():
        rows = configs["gpu"].astype(str).to_numpy() == gpu
        if calibration is None:
            continue
        before = len(calibration.timings)
        out.loc[rows, ["epoch_time_s", "epoch_time_s_low", "epoch_time_s_high"]] = \
            calibrate.predict(calibration, configs[rows]).to_numpy()
        out.loc[rows, "source"] = "calibrated"
        if len(calibration.timings) > before:
            calibrate.store_added(calibration)
    if (~mine).any():
        from ._deps import missing_dependencies, missing_message

        missing = missing_dependencies()
        if missing:
            raise AdvisorInputError(missing_message(missing))
        from .advisor import Advisor

        advisor = Advisor.fit(_sources(args), cache=not args.no_cache)
        pred = advisor.predict(configs[~mine].drop(columns=["measured_s"]))
        for column in ("epoch_time_s", "epoch_time_s_low", "epoch_time_s_high", "outside_logs"):
            out.loc[~mine, column] = pred[column].to_numpy()
        out.loc[~mine, "source"] = np.where(pred["outside_logs"] == "", "logs", "physical terms (outside the logs)")
    shown = out[[c for c in ("model_name", "gpu", "dataset", "batch_size", "num_workers_data_loader", "num_of_gpus")
                 if c in out.columns] + ["epoch_time_s", "epoch_time_s_low", "epoch_time_s_high", "measured_s",
                                          "source", "outside_logs"]]
    if args.json:
        print(json.dumps({"units": {"epoch_time_s": "s", "epoch_time_s_low": "s", "epoch_time_s_high": "s",
                                    "measured_s": "s (median epoch of the CSV)"},
                          "configurations": shown.replace({np.nan: None}).to_dict(orient="records")},
                         indent=1, default=float))
    else:
        print(shown.replace({"outside_logs": {"": "-"}}).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("(seconds per epoch: the prediction and its 80% range; measured_s: the CSV's median epoch; source: "
              "calibrated = measured on this machine (disttrain advise --calibrate), logs = the fitted time model, "
              "physical terms = outside what the logs cover)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"disttrain advise: {e}", file=sys.stderr)
        return 2
    from ._deps import missing_dependencies, missing_message

    # --predict alone reads CSVs (pandas) and, for a device calibrated here, measures with torch:
    # LightGBM, SciPy and scikit-learn (seconds of imports for each such process) are checked
    # there only when a configuration needs the fitted model.
    only_predict = args.predict and not (args.serve or args.evaluate or args.calibrate)  # else refused below
    missing = missing_dependencies(("pandas",) if only_predict else None)
    if missing:
        print(f"disttrain advise: {missing_message(missing)}", file=sys.stderr)
        return 2
    try:
        mode = _mode(args)
        if mode == "--serve":
            from .server import serve

            port = 8765 if args.port is None else args.port
            if not 0 <= port <= 65535:
                raise AdvisorInputError(f"--port {port}: give a port number from 0 to 65535 (0: any free port)")
            return serve(args.host or "127.0.0.1", port, _sources(args), cache=not args.no_cache)
        if mode == "--evaluate":
            return _evaluate(args)
        if mode == "--calibrate":
            return _calibrate(args)
        if mode == "--predict":
            return _predict(args)
        return _recommend(args)
    except AdvisorInputError as e:
        print(f"disttrain advise: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
