"""One decentralised peer for tests/test_decentralised.py: trains a small model
on synthetic data and writes, after each committed round, the round number
and a digest of its parameters to OUT (one JSON line), so the test can compare
peers' parameters round by round.

argv: OUT LISTEN_HOST INITIAL_PEERS('' for none) STEPS WAIT_FOR [DIE_AT_ROUND]
STEPS is a number of local steps, or a file name: train until it exists (at
most 120 s). The peer first waits until it sees WAIT_FOR other peers. A peer
given DIE_AT_ROUND kills itself with SIGKILL inside the averaging of that
round, after its group was formed: a peer lost mid-round."""

import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.strategies import decentralised as dec

out, host, initial, steps, wait_for = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
die_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
torch.set_num_threads(1)
if os.environ.get("DISTTRAIN_TEST_LOG"):
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
peer = dec.Peer(model, torch.optim.SGD(model.parameters(), lr=0.05), initial_peers=initial or None, host=host,
                secret=b"test secret",
                config=dec.DecentralisedConfig(local_steps=3, matchmaking_window=1.0, peer_timeout=2.0,
                                               heartbeat_interval=0.25, round_timeout=10.0))

average = peer._averager.average


class Averager:  # the real averager, with a kill point
    def __getattr__(self, name):
        return getattr(peer._averager_real, name)

    def average(self, *args, **kwargs):
        if die_at is not None and peer.round >= die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return average(*args, **kwargs)


peer._averager_real = peer._averager
peer._averager = Averager()
committed = dec.Peer.run_round


def run_round(self):
    done = committed(self)
    if done:
        digest = hashlib.sha256(torch.nn.utils.parameters_to_vector(self.params).detach().numpy().tobytes())
        with open(out, "a") as f:
            f.write(json.dumps({"round": self.round, "digest": digest.hexdigest(), "group": self.stats.group_sizes[-1],
                                "time": time.time()}) + "\n")
    return done


dec.Peer.run_round = run_round
peer.start()
with open(out + ".address", "w") as f:
    f.write(peer.address)
g = torch.Generator().manual_seed(os.getpid())
w = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
peer.wait_for_peers(wait_for, timeout=60)
deadline = time.monotonic() + 120
step = 0
while (step < int(steps)) if steps.isdigit() else (not os.path.exists(steps) and time.monotonic() < deadline):
    step += 1
    x = torch.randn(16, 20, generator=g)
    peer.train_step(x, (x @ w).argmax(1), F.cross_entropy)
    time.sleep(0.02)  # peers of different speeds would drift; this keeps them near each other
peer.close()
print(json.dumps({"rounds": peer.stats.rounds, "resyncs": peer.stats.resyncs, "failed": peer.stats.attempts_failed,
                  "rejections": peer.rejections}))
