"""How well `disttrain advise --predict` predicts a multi-process CPU run (issue 21).

    python benchmarks/calibrate_ranks.py [PAIRS] [RANKS]      (default 8 pairs, 2 ranks)

Needs a calibration of this machine (`disttrain advise --calibrate`). Each pair: a 12-epoch
`disttrain train --nproc-per-node RANKS -b 32` run (the small CNN on the digits), then `disttrain
advise --predict` on its metrics.csv with the calibration's multi-process timings dropped first, so
that the configuration is measured anew (RANKS spawned processes). Prints each pair's measured epoch
(the median of the run's epochs after the first), the prediction and its 80% interval, their ratio
and whether the interval holds the run, then the median ratio and the count inside; writes
benchmarks/results/calibrate_ranks_RANKS.csv. A benchmark, not a test: the machine's load moves every figure.
"""
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from disttrain.advisor import calibrate


def main() -> int:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    ranks = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if calibrate.load("cpu") is None:
        print("no calibration of this machine: run `disttrain advise --calibrate` first", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="calibrate-ranks-") as folder:
        for i in range(pairs):
            calibration = calibrate.load("cpu")
            calibration.timings = [t for t in calibration.timings if t.get("processes", 1) == 1]
            calibrate.store(calibration)
            run = Path(folder, f"run{i}")
            subprocess.run([sys.executable, "-m", "disttrain", "train", "--nproc-per-node", str(ranks), "-e", "12",
                            "-b", "32", "-s", str(run), "--save-name", "r", "--no-progress"], check=True,
                           capture_output=True)
            with open(run / "r" / "metrics.csv") as f:
                epochs = [float(r["epoch_timings"]) for r in csv.DictReader(f) if r.get("rank", "0") == "0"]
            measured = float(np.median(epochs[1:]))
            out = subprocess.run([sys.executable, "-m", "disttrain", "advise", "--predict",
                                  str(run / "r" / "metrics.csv"), "--json"], check=True, capture_output=True, text=True)
            (row,) = json.loads(out.stdout)["configurations"]
            inside = row["epoch_time_s_low"] <= measured <= row["epoch_time_s_high"]
            rows.append({"ranks": ranks, "measured_s": measured, "predicted_s": row["epoch_time_s"],
                         "low_s": row["epoch_time_s_low"], "high_s": row["epoch_time_s_high"],
                         "ratio": row["epoch_time_s"] / measured, "inside": inside, "load": os.getloadavg()[0]})
            print(f"measured {measured:.4f} s, predicted {row['epoch_time_s']:.4f} s "
                  f"[{row['epoch_time_s_low']:.4f}, {row['epoch_time_s_high']:.4f}], ratio {rows[-1]['ratio']:.3f}, "
                  f"inside {inside}, load {rows[-1]['load']:.1f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"median ratio {np.median(ratios):.3f}; {sum(r['inside'] for r in rows)} of {len(rows)} inside their "
          f"interval; {sum(abs(x - 1) <= 0.2 for x in ratios)} within 20%")
    out_path = Path(f"benchmarks/results/calibrate_ranks_{ranks}.csv")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
