"""Parameter server on one machine: 1 worker x 4 epochs against 4 workers x 1 epoch,
as in the original study, and 4 workers x 4 epochs.

Each worker trains on its own quarter of the data (each sample once per epoch),
unlike the classic study, where every process read the whole data set: here
"4 workers x 1 epoch" is one pass over the data in all, a quarter of the
samples "1 worker x 4 epochs" trains on, and "4 workers x 4 epochs" is the
like-for-like run (four passes, shared by four workers). Same model
(disttrain's small CNN) and optimizer; one server rank holds the parameters.
Prints elapsed times (training, and with process start-up) and test accuracies.

    python examples/parameter_server_example.py                 # asynchronous
    python examples/parameter_server_example.py --mode sync     # or ssp --staleness 2
"""

import argparse

import torch
from torch.utils.data import DataLoader

from disttrain import data
from disttrain.strategies.parameter_server import launch_ps_and_workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("sync", "ssp", "async"), default="async")
    p.add_argument("--staleness", type=int, default=2, help="ssp: the bound s (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (default 3e-3)")
    args = p.parse_args()

    train = DataLoader(data.digits(train=True), batch_size=args.batch_size, shuffle=True)
    test = DataLoader(data.digits(train=False), batch_size=512)
    rows = []
    for workers, epochs in ((1, 4), (4, 1), (4, 4)):
        _, stats = launch_ps_and_workers(workers + 1, epochs, train, test, mode=args.mode, staleness=args.staleness,
                                         optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
                                         log_interval=-1)
        rows.append((f"{workers} worker(s) x {epochs} epoch(s)", stats))
    print(f"\nparameter server, mode {args.mode}, digits ({len(train.dataset)} training samples), small CNN")
    print(f"{'configuration':<26} {'samples':>8} {'training s':>10} {'with start-up s':>16} {'updates':>8} "
          f"{'updates/s':>10} {'max staleness':>13} {'test accuracy':>13}")
    for name, s in rows:
        print(f"{name:<26} {s.samples:>8} {s.elapsed:>10.2f} {s.wall:>16.2f} {s.updates:>8} "
              f"{s.updates_per_second:>10.1f} {s.max_applied_staleness:>13} {s.final_accuracy:>13.4f}")


if __name__ == "__main__":
    main()
