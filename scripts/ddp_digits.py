"""PyTorch's DistributedDataParallel over the disttrain backend on the embedded
digits data set. Run: torchrun --nproc-per-node 2 scripts/ddp_digits.py"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import disttrain
from disttrain.data import digits
from disttrain.models import small_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="disttrain")
    args = parser.parse_args()

    rank, world = disttrain.init(backend=args.backend)
    torch.manual_seed(0)
    train_set, test_set = digits(train=True), digits(train=False)
    sampler = DistributedSampler(train_set, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    model = DDP(small_cnn(num_classes=10, in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world} ranks, backend {dist.get_backend()}, {len(train_set)} training samples")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(y), len(y)])
        dist.all_reduce(total)
        model.eval()
        with torch.no_grad():
            x, y = test_set.tensors
            acc = (model(x).argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: train loss {total[0] / total[1]:.4f}, test accuracy {acc:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
