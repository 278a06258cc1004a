"""``disttrain advise``: recommend, evaluate or serve.

    disttrain advise --model resnet50 --target-acc 0.75 [--gpus P40 V100-SXM2]
                     [--prices prices.csv] [--deadline-hours H] [--json]
    disttrain advise --evaluate [--max-folds K] [--json]
    disttrain advise --serve [--port P]

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
    p.add_argument("--deadline-hours", type=float)
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table to print")
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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    return p


def _sources(args) -> list:
    from .loading import data_sources

    return data_sources(args.data, default_logs=not args.no_default_logs)


def _recommend(args) -> int:
    from .advisor import Advisor
    from .hardware import DEFAULT_PRICES, gpu_family, read_prices
    from .recommend import display_table

    if not args.model or args.target_acc is None:
        raise AdvisorInputError("give --model and --target-acc (or --evaluate, --serve)")
    if args.deadline_hours is not None and not 0 < args.deadline_hours < float("inf"):
        raise AdvisorInputError(f"--deadline-hours {args.deadline_hours}: give a positive number of hours")
    if args.top < 1:
        raise AdvisorInputError(f"--top {args.top}: give at least 1 row")
    prices = read_prices(args.prices) if args.prices else dict(DEFAULT_PRICES)
    gpus = None
    if args.gpus:
        gpus = []
        for name in args.gpus:
            family = gpu_family(name)
            if family is None:
                raise AdvisorInputError(f"unknown GPU '{name}' (known families: {', '.join(sorted(DEFAULT_PRICES))})")
            gpus.append(family)
    advisor = Advisor.fit(_sources(args), cache=not args.no_cache)
    rec = advisor.recommend(args.model.lower(), args.target_acc, prices=prices, gpus=gpus,
                            deadline_hours=args.deadline_hours)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=1, default=float))
    else:
        print(rec.message)
        if not rec.table.empty:
            print(display_table(rec, args.top).to_string(index=False))
            print(f"(epochs_to_target: where the median predicted curve reaches the target; epochs_80pct_sure: "
                  f"by which epoch 80% of the predicted curves have; cost in {rec.units['cost']} for the GPUs x hours; "
                  f"data_split_across_gpus: each GPU trains on its share of the data, '-' for one GPU)")
    return 1 if rec.out_of_reach else 0


def _fold_progress(split: str, done: int, folds: int) -> None:
    """Progress on stderr: a fold counter on a terminal, a line per split otherwise."""
    if sys.stderr.isatty():
        print(f"\r  split {split}: fold {done}/{folds}", end="\n" if done == folds else "", file=sys.stderr, flush=True)
    elif done == folds:
        print(f"  split {split}: {folds} folds done", file=sys.stderr, flush=True)


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
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(results_csv, index=False)
    if args.json:
        print(json.dumps({"summary": summary.replace([np.inf], None).to_dict(orient="records"),
                          "random_split_baseline": result["random_split"]}, indent=1, default=float))
        return 0
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
    if args.max_folds is None:
        print(f"\nwritten: {results_csv} (in a checkout, refresh docs/advisor_results.md with "
              f"'python -m disttrain.advisor.results_page')")
    else:
        print(f"\nwritten: {results_csv} (at most {args.max_folds} folds per split: not the committed evaluation)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"disttrain advise: {e}", file=sys.stderr)
        return 2
    from ._deps import missing_dependencies, missing_message

    missing = missing_dependencies()
    if missing:
        print(f"disttrain advise: {missing_message(missing)}", file=sys.stderr)
        return 2
    try:
        if args.serve:
            from .server import serve

            if not 0 <= args.port <= 65535:
                raise AdvisorInputError(f"--port {args.port}: give a port number from 0 to 65535 (0: any free port)")
            return serve(args.host, args.port, _sources(args), cache=not args.no_cache)
        if args.evaluate:
            return _evaluate(args)
        return _recommend(args)
    except AdvisorInputError as e:
        print(f"disttrain advise: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
