"""Pipelined evaluation across MPI ranks: read image -> resize -> normalise -> predict.

    mpiexec -n 4 python examples/mpi_train.py               # trains, writes runs/mpi_train/checkpoint.dts
    mpiexec -n 5 python examples/mpi_evaluate.py            # 4 stages, the last one on ranks 3 and 4

Each stage runs on its own rank (disttrain.strategies.mpi.pipeline); the last
stage (the model) is replicated over the remaining ranks. Images move between
ranks as tensors over the disttrain backend, at most --queue-depth ahead of the
next stage; rank 0 gets the predictions back in file order and prints the
accuracy and each stage's throughput and queue occupancy. Without --data it
evaluates the digits image folder mpi_train.py wrote.
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
    p.add_argument("--run", default="runs/mpi_train", help="mpi_train.py's --out (checkpoint and default data)")
    p.add_argument("--data", default=None, help="image folder (one folder per class); default RUN/digits_png")
    p.add_argument("--image-size", type=int, default=8, help="the size the model was trained on (default 8)")
    p.add_argument("--queue-depth", type=int, default=4, help="items a stage may send ahead (default 4)")
    args = p.parse_args()

    torch.set_num_threads(1)
    rank, world = disttrain.init()
    if world < 4:  # read, resize, normalise, predict: one rank each
        dist.barrier()  # every rank connected: none is cut off mid-setup by another's exit
        dist.destroy_process_group()
        p.exit(2, f"mpi_evaluate.py: the 4-stage pipeline needs at least 4 ranks, the job has {world} "
                  f"(mpiexec -n 4 or more)\n")
    data = args.data or os.path.join(args.run, "digits_png")
    files = mpi.image_files(data) if rank == 0 else []
    classes = [len({label for _, label in files})]
    dist.broadcast_object_list(classes, src=0)
    checkpoint = os.path.join(args.run, "checkpoint.dts")
    channels = [mpi.read_image(files[0][0]).shape[0] if rank == 0 else 0]
    dist.broadcast_object_list(channels, src=0)
    model = models.get_model("small_cnn", num_classes=classes[0], in_channels=channels[0]).eval()
    if mpi.load_checkpoint(checkpoint, model) is None and rank == 0:
        print(f"no checkpoint at {checkpoint}: evaluating an untrained model", flush=True)

    def read(entry: tuple[str, int]) -> torch.Tensor:
        return mpi.read_image(entry[0])  # (C, H, W) uint8

    def resize(image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(image.float()[None], size=(args.image_size, args.image_size), mode="bilinear",
                             align_corners=False, antialias=True)[0]

    def normalise(image: torch.Tensor) -> torch.Tensor:
        return image / 255.0  # as mpi_train.py scales its inputs

    def predict(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(image[None]).argmax(1)

    result = mpi.pipeline([("read", read), ("resize", resize), ("normalise", normalise), ("predict", predict)],
                          files, queue_depth=args.queue_depth)
    if rank == 0:
        assert result.outputs is not None
        predicted = torch.cat(result.outputs)
        labels = torch.tensor([label for _, label in files])
        print(f"{len(files)} images on {world} ranks in {result.seconds:.2f} s "
              f"({len(files) / result.seconds:.0f} images/s); accuracy {(predicted == labels).float().mean():.4f}")
        print(result.report(), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
