"""MPI-style data-parallel training, launched the HPC way:

    mpiexec -n 3 python examples/mpi_train.py                  # Open MPI / MPICH
    srun -n 3 python examples/mpi_train.py                     # Slurm
    torchrun --nproc-per-node 3 examples/mpi_train.py          # the same job under torchrun

The mpi4py recipe with disttrain underneath (disttrain.strategies.mpi): rank 0
lists the data set's files and scatters them evenly, rank 0's parameters are
broadcast, each step's gradients are averaged with one fused all-reduce, and
rank 0 writes a checkpoint (snapshot format) after every epoch; --resume
continues from it. Without --data the digits data set (embedded, no download)
is written as an image folder of 8x8 PNGs first.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import disttrain
from disttrain import models
from disttrain.strategies import mpi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="image folder (one folder per class); default: digits as PNGs")
    p.add_argument("--out", default="runs/mpi_train", help="checkpoint folder (default runs/mpi_train)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--max-files", type=int, default=None, help="use N of the files, spread over the classes (quick runs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.dts if it exists")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)
    rank, world = disttrain.init()
    data = args.data or os.path.join(args.out, "digits_png")
    if rank == 0 and args.data is None:
        mpi.write_digits_folder(data)
    files = mpi.image_files(data) if rank == 0 else []
    if args.max_files is not None:  # spread over the classes (the list is sorted by class)
        files = files[::max(1, len(files) // args.max_files)][:args.max_files]
    mine = mpi.scatter_files(files)  # (path, label) pairs, an even share per rank

    def load(path: str) -> torch.Tensor:
        image = mpi.read_image(path).float().div(255.0)[None]
        if image.shape[-1] != args.image_size:
            image = F.interpolate(image, size=(args.image_size, args.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
        return image[0]

    images = torch.stack([load(path) for path, _ in mine])
    labels = torch.tensor([label for _, label in mine])
    classes = torch.tensor([int(labels.max()) + 1])
    dist.all_reduce(classes, op=dist.ReduceOp.MAX)

    torch.manual_seed(args.seed + rank)  # different on each rank: the broadcast makes them equal
    model = models.get_model("small_cnn", num_classes=int(classes), in_channels=images.shape[1])
    mpi.broadcast_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    average = mpi.GradientAverager(model)
    checkpoint = os.path.join(args.out, "checkpoint.dts")
    state = mpi.load_checkpoint(checkpoint, model, optimizer) if args.resume else None
    start_epoch = state["extra"]["epoch"] if state else 0
    step = state["step"] if state else 0
    if state and rank == 0:
        print(f"resumed from {checkpoint} at epoch {start_epoch}, step {step}", flush=True)

    # Every rank takes the same number of steps (its share is at most one file larger).
    steps = torch.tensor([len(mine) // args.batch_size])
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch * 97 + rank))
        total = torch.zeros(2)
        for i in range(int(steps)):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            average.zero_grad()  # drops the gradients: backward writes each once, into the last step's memory
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            average()  # one fused all-reduce of every gradient
            optimizer.step()
            step += 1
            total += torch.tensor([loss.item(), 1.0])
        dist.all_reduce(total)
        mpi.save_checkpoint(checkpoint, model, optimizer, step=step, extra={"epoch": epoch + 1})
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: mean loss {total[0] / total[1]:.4f} over {world} ranks, "
                  f"{int(steps)} steps of {args.batch_size}/rank; checkpoint {checkpoint}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
