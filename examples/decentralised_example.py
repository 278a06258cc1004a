"""Decentralised training on one machine: three peers (threads here; processes or
machines in real use) that find each other from one address, train locally for H
steps and average their deltas (DiLoCo). A fourth peer joins half-way and
downloads the current state.

    python examples/decentralised_example.py

On several machines, one command per peer:

    disttrain train --strategy decentralised --listen 10.0.0.1:7000 -e 5 --local-steps 20
    disttrain train --strategy decentralised --listen 10.0.0.2:7000 --initial-peers 10.0.0.1:7000 -e 5 --local-steps 20
"""

import threading

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from disttrain import data, models
from disttrain.strategies import decentralised as dec

train_set, test_set = data.digits(), data.digits(train=False)


def peer_main(index, first_address, started, results, rounds_done):
    torch.manual_seed(index)
    model = models.small_cnn()
    peer = dec.Peer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), secret=b"example",
                    initial_peers=first_address, config=dec.DecentralisedConfig(local_steps=10, matchmaking_window=1.0))
    peer.start()
    started.append(peer.address)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(index))
    for _ in range(3 if index < 3 else 1):
        for x, y in loader:
            peer.train_step(x, y, F.cross_entropy)
            rounds_done[index] = peer.stats.rounds
    _, accuracy, _ = dec.evaluate(model, DataLoader(test_set, batch_size=256))  # loss, top-1, samples
    results[index] = (accuracy, peer.stats.rounds, peer.stats.resyncs, sum(peer.stats.bytes_sent))
    peer.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    started, results, rounds_done = [], {}, {}
    first = threading.Thread(target=peer_main, args=(0, None, started, results, rounds_done))
    first.start()
    while not started:
        threading.Event().wait(0.1)
    threads = [threading.Thread(target=peer_main, args=(i, started[0], started, results, rounds_done)) for i in (1, 2)]
    for t in threads:
        t.start()
    while rounds_done.get(0, 0) < 4:  # a fourth peer joins mid-training
        threading.Event().wait(0.1)
    late = threading.Thread(target=peer_main, args=(3, started[0], started, results, rounds_done))
    late.start()
    for t in [first, *threads, late]:
        t.join()
    for i, (accuracy, rounds, resyncs, sent) in sorted(results.items()):
        print(f"peer {i}: test accuracy {accuracy:.3f}, {rounds} rounds, {resyncs} state downloads, "
              f"{sent / 1e6:.2f} MB sent")
