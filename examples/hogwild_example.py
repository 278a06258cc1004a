"""Hogwild on one machine: the three configurations of the original study
(1 process x 4 epochs, 4 processes x 1 epoch, 2 x 2) on the embedded digits
data, with their elapsed times and a chart of the training losses.

    python examples/hogwild_example.py [--model small_cnn|mlp] [--out hogwild_losses.png]

In the original study every process reads the whole data set each epoch, so
"4 x 1" and "1 x 4" both make 4 passes over it: that is ``data="full"``, used
for the three configurations here. disttrain's default, ``data="split"``, deals
each epoch out between the processes (each sample once per epoch), so the same
work is "4 processes x 4 epochs": the last two rows. Every run starts from the
same initial model, with SGD and momentum in shared memory.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from disttrain import data, models
from disttrain.strategies import hogwild


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn", choices=("small_cnn", "mlp"))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="hogwild_losses.png", help="where the loss chart is saved")
    args = parser.parse_args()

    train = DataLoader(data.digits(train=True), batch_size=32)
    test = DataLoader(data.digits(train=False), batch_size=256)
    losses = {}
    for processes, epochs, mode in [(1, 4, "full"), (4, 1, "full"), (2, 2, "full"), (4, 4, "split"), (2, 4, "split")]:
        torch.manual_seed(0)  # the same initial model for every configuration
        model = models.small_cnn() if args.model == "small_cnn" else models.mlp(hidden=128)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        start = time.perf_counter()
        result = hogwild.train_model(model, train, processes, epochs, optimizer, log_interval=-1,
                                     test_dataloader=test, data=mode)
        name = f"{processes} x {epochs}, data={mode}"
        hogwild.log_elapsed_time(processes, epochs, start, time.perf_counter())
        passes = epochs * (processes if mode == "full" else 1)
        print(f"  {mode} data: {passes} passes over the data set, training {result.elapsed:.2f} s, "
              f"{result.updates_per_second:.0f} updates/s, "
              f"test accuracy {result.test_accuracy:.3f}")
        losses[name] = result
    hogwild.chart_losses(losses, path=args.out, smooth=10)
    print(f"loss chart: {args.out}")


if __name__ == "__main__":
    main()
