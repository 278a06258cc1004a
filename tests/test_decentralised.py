"""Decentralised training (disttrain.strategies.decentralised): equality with
synchronous data-parallel training, bad peers, churn, the CLI, and four peers
on a slow emulated network."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disttrain._C as C
from disttrain.strategies import decentralised as dec

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = b"t" * 32
HEADER = struct.Struct("<IBBBB32sQIIIfQdQ")  # csrc/strategies/group_averager.cpp's AverageHeader


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _shards(num_peers, steps, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * num_peers * batch, 10, generator=g)
    y = (x[:, :3]).argmax(1)
    return [[(x[(s * num_peers + i) * batch:(s * num_peers + i + 1) * batch],
              y[(s * num_peers + i) * batch:(s * num_peers + i + 1) * batch]) for s in range(steps)]
            for i in range(num_peers)]


def _synchronous(shards, steps, lr):
    """Synchronous data-parallel SGD: the mean of the peers' gradients each step."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(steps):
        grads = []
        for shard in shards:
            model.zero_grad()
            F.cross_entropy(model(shard[s][0]), shard[s][1]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for j, p in enumerate(model.parameters()):
            p.grad = sum(g[j] for g in grads) / len(grads)
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def _start_peers(n, config):
    peers = []
    for i in range(n):
        m = _model()
        p = dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1), secret=b"s", config=config(),
                     initial_peers=[peers[0].address] if peers else None)
        p.start()
        peers.append(p)
    for p in peers:
        p.wait_for_peers(n - 1, timeout=30)
    return peers


@pytest.mark.parametrize("mode", ["diloco_h1", "target_batch"])
def test_equals_synchronous_data_parallel(mode):
    """H = 1 (outer SGD, lr 1, no momentum) or a target batch of all peers' batches, no
    compression, every peer in every group: the parameters equal synchronous data-parallel
    SGD's (relative 1e-5), on every peer, at 3 peers."""
    n, steps = 3, 6
    if mode == "diloco_h1":
        config = lambda: dec.DecentralisedConfig(local_steps=1, outer_lr=1.0, outer_momentum=0.0,
                                                 matchmaking_window=5.0)
    else:
        config = lambda: dec.DecentralisedConfig(local_steps=None, target_batch_size=n * 8, matchmaking_window=5.0)
    shards = _shards(n, steps)
    peers = _start_peers(n, config)
    try:
        def run(i):
            for x, y in shards[i]:
                peers[i].train_step(x, y, F.cross_entropy)
                if mode == "target_batch":  # each peer's batch, then the round once all three are in
                    while peers[i].stats.rounds < peers[i].stats.local_steps and not peers[i].run_round():
                        pass
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        reference = _synchronous(shards, steps, lr=0.1)
        for p in peers:
            assert p.stats.rounds == steps and p.stats.group_sizes == [n] * steps
            got = torch.nn.utils.parameters_to_vector(p.params).detach()
            assert float((got - reference).norm() / reference.norm()) < 1e-5
    finally:
        for p in peers:
            p.close()


def _header(**fields):
    h = dict(magic=0x56415444, version=1, phase=1, wire=0, reserved=0, token=TOKEN, round=7, sender=1, part=0,
             group_size=2, scale=1.0, count=5, weight=1.0, payload_bytes=20)
    h.update(fields)
    return HEADER.pack(*h.values())


def _send(port, data):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)


@pytest.mark.parametrize("case", ["garbage", "wrong_secret", "wrong_shape", "wrong_dtype", "nan"])
def test_bad_messages_are_rejected_with_a_reason_and_never_averaged(case):
    """A group of two: a real averager (member 0) and a hand-written member 1 that sends one bad
    contribution. The real member's part is its own values alone, and the reason is reported."""
    averager = C.GroupAverager(TOKEN, 0)
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(8)
    try:
        vec = torch.arange(10, dtype=torch.float32)  # part 0 (owned by member 0): elements 0..4
        payloads = {
            "garbage": b"GET / HTTP/1.1\r\n\r\n" + bytes(100),
            "wrong_secret": _header(token=b"x" * 32) + struct.pack("<5f", *[1.0] * 5),
            "wrong_shape": _header(count=4, payload_bytes=16) + struct.pack("<4f", *[1.0] * 4),
            "wrong_dtype": _header(wire=1, payload_bytes=10) + bytes(10),
            "nan": _header() + struct.pack("<5f", 1.0, float("nan"), 1.0, 1.0, 1.0),
        }
        _send(averager.port, payloads[case])
        time.sleep(0.2)
        out = vec.clone()
        result = averager.average(out, 7, [("127.0.0.1", averager.port), ("127.0.0.1", fake.getsockname()[1])], 0,
                                  1.0, "float32", 3.0)
        assert torch.equal(out[:5], vec[:5])  # nothing of the bad message averaged in
        assert result["contributors"] == 1
        reasons = [r for _, r in result["rejected"]] + averager.take_refusals()
        expected = {"garbage": "garbage", "wrong_secret": "wrong secret", "wrong_shape": "wrong shape",
                    "wrong_dtype": "wrong dtype", "nan": "non-finite"}[case]
        assert any(expected in r for r in reasons), reasons
        assert not result["rejected"] or result["rejected"][0][0] == 1
    finally:
        fake.close()
        averager.close()


def test_compressed_averaging_is_close_and_identical_on_every_member():
    averagers = [C.GroupAverager(TOKEN, 0) for _ in range(3)]
    group = [("127.0.0.1", a.port) for a in averagers]
    vecs = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mean = sum(vecs) / 3
    for round_, (wire, tolerance, ratio) in enumerate([("bfloat16", 0.02, 0.5), ("int8", 0.05, 0.25)]):
        outs = [v.clone() for v in vecs]
        results = [None] * 3

        def run(i):
            results[i] = averagers[i].average(outs[i], round_, group, i, 1.0, wire, 10.0)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(outs[0], o) for o in outs)
        assert float((outs[0] - mean).abs().max()) < tolerance * float(mean.abs().max()) * 3
        # float32 would be 3 peers x 2 phases x 2/3 of 4000 bytes, plus a header per message
        assert sum(r["bytes_sent"] for r in results) <= ratio * 16000 + 3 * 4 * 88
    for a in averagers:
        a.close()


def test_control_messages_with_a_wrong_secret_are_rejected():
    m = _model()
    with dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1), secret=b"right") as peer:
        peer.start()
        wrong = dec._token(b"wrong", b"control")
        with pytest.raises(OSError):
            dec._request(("127.0.0.1", peer.port), wrong, {"kind": "get_state"}, 2.0)
        assert any("bad signature" in r for r in peer.rejections), peer.rejections
        assert peer.live_peers() == []


def _worker(tmp_path, name, initial="", steps="60", wait_for=0, die_at=None):
    out = tmp_path / name
    argv = [sys.executable, os.path.join(HERE, "decentralised_worker.py"), str(out), "127.0.0.1", initial, str(steps),
            str(wait_for)]
    if die_at is not None:
        argv.append(str(die_at))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(str(out) + ".address"):
        assert proc.poll() is None or die_at is not None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.1)
    return proc, out


def _rounds(path):
    if not os.path.exists(path):
        return {}
    return {r["round"]: r for r in map(json.loads, open(path).read().splitlines())}


def test_churn_peer_killed_mid_round_and_a_newcomer_catches_up(tmp_path):
    """Three peers; one kills itself with SIGKILL inside round 3's averaging; a fourth joins
    later. The others go on (rounds after the kill), no one hangs, and the newcomer's
    parameters after its first round equal the others' after the same round."""
    stop = str(tmp_path / "stop")
    a, a_out = _worker(tmp_path, "a", steps=stop, wait_for=2)
    address = open(str(a_out) + ".address").read()
    b, b_out = _worker(tmp_path, "b", address, steps=stop, wait_for=2)
    c, _ = _worker(tmp_path, "c", address, steps=stop, wait_for=2, die_at=3)
    assert c.wait(60) == -9
    d, d_out = _worker(tmp_path, "d", address, steps="30")
    stdout, stderr = d.communicate(timeout=120)
    assert d.returncode == 0, stderr[-3000:]
    results = {"d": json.loads(stdout.strip().splitlines()[-1])}
    open(stop, "w").close()
    for name, proc in (("a", a), ("b", b)):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    ra, rb, rd = _rounds(a_out), _rounds(b_out), _rounds(d_out)
    assert max(ra) > 6 and max(rb) > 6, (sorted(ra), sorted(rb))  # training went on after the kill
    assert rd, "the newcomer committed no round"
    first = min(rd)
    assert rd[first]["digest"] == ra[first]["digest"] == rb[first]["digest"]
    assert rd[first]["group"] >= 2
    common = set(ra) & set(rb) & set(rd)
    assert all(ra[r]["digest"] == rb[r]["digest"] == rd[r]["digest"] for r in common)


def test_cli_rejects_bad_decentralised_options(tmp_path, capsys):
    from disttrain.train_cli import main

    for args, message in [
        (("--strategy", "decentralised", "--initial-peers", "nohostport"), "--initial-peers"),
        (("--strategy", "decentralised", "--listen", "10.0.0.1"), "--listen"),
        (("--strategy", "decentralised", "--local-steps", "5", "--target-batch-size", "64"), "choose one"),
        (("--strategy", "decentralised", "--local-steps", "0"), "--local-steps"),
        (("--strategy", "decentralised", "--outer-momentum", "1.5"), "--outer-momentum"),
        (("--local-steps", "5",), "applies to --strategy decentralised only"),
        (("--strategy", "decentralised", "--nproc-per-node", "2"), "one process"),
        (("--strategy", "decentralised", "--wait-for-peers", "-1"), "--wait-for-peers"),
        (("--wait-for-peers", "2",), "applies to --strategy decentralised only"),
        # The trainer's options a peer does not use were taken and ignored.
        (("--strategy", "decentralised", "--milestones", "2,4"), "--milestones: does not apply to --strategy decentralised"),
        (("--strategy", "decentralised", "--backend", "gloo"), "--backend: does not apply"),
        (("--strategy", "decentralised", "--tensorboard"), "--tensorboard: does not apply"),
    ]:
        assert main(["train", *args, "-s", str(tmp_path)][1:]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    """A peer that cannot start (its --listen port taken) exits 1 with one line, not a traceback."""
    import socket

    from disttrain.train_cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["--strategy", "decentralised", "--listen", f"127.0.0.1:{port}", "-e", "1", "-s", str(tmp_path),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "cannot listen" in err and str(port) in err, err
    # A batch larger than the data set trained no step and logged a loss of 0.
    assert main(["--strategy", "decentralised", "-b", "5000", "-e", "1", "-s", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "-b/--batch-size 5000 is more than the data set's" in err, err


def test_a_resumed_peer_goes_on_with_its_metrics(tmp_path, capsys):
    """A peer run again in its folder resumed its state but rewrote metrics.csv and peers.csv with
    its new epochs only (the earlier ones lost) and trained -e more epochs; it now goes on from its
    snapshot's epochs to -e in all, as the trainer does. Its folder is the only one made (the
    checks made a stray <model>_<data>_b<batch> folder)."""
    import pandas as pd

    from disttrain.train_cli import main

    args = ["--strategy", "decentralised", "-s", str(tmp_path), "--no-progress", "--listen", "127.0.0.1:0"]
    assert main([*args, "-e", "1"]) == 0, capsys.readouterr().err
    assert main([*args, "-e", "3"]) == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["small_cnn_digits_decentralised"]
    run = tmp_path / "small_cnn_digits_decentralised"
    metrics, peers = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "peers.csv")
    assert list(metrics.iloc[:, 0]) == [0, 1, 2] and list(peers["epoch"]) == [0, 1, 2]
    assert peers["wall_time_s"].is_monotonic_increasing
    assert main([*args, "-e", "3"]) == 0  # done: nothing more to train, nothing lost
    assert list(pd.read_csv(run / "metrics.csv").iloc[:, 0]) == [0, 1, 2]


def test_config_rejects_attempts_below_one_and_an_infinite_outer_lr():
    """max_attempts 0 used to be accepted and silently disabled every round (training went on
    alone, never averaging); an infinite outer_lr made every parameter inf at the first round."""
    for kwargs, message in [(dict(max_attempts=0), "max_attempts"), (dict(max_attempts=-1), "max_attempts"),
                            (dict(max_attempts=1.5), "max_attempts"), (dict(outer_lr=float("inf")), "outer_lr")]:
        with pytest.raises(ValueError, match=message):
            dec.DecentralisedConfig(**kwargs).validate()


def test_close_without_start_and_start_twice():
    """close() of a peer that was never started used to hang forever (socketserver's shutdown()
    waits for a serve_forever() that never ran), e.g. `with Peer(...)` left by an exception before
    start(); a second start() said only 'threads can only be started once'."""
    m = _model()
    peer = dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1), secret=b"s")
    closer = threading.Thread(target=peer.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() without start() hangs"
    with pytest.raises(dec.DecentralisedError, match="closed"):
        peer.start()
    m = _model()
    with dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1), secret=b"s") as peer:
        peer.start()
        with pytest.raises(dec.DecentralisedError, match="already started"):
            peer.start()


@pytest.mark.parametrize("mode", ["diloco", "target_batch"])
def test_batchnorm_buffers_are_averaged(mode):
    """A committed round left every peer with its own BatchNorm running statistics (only the
    parameters were averaged), so peers whose parameters were equal evaluated differently. Now the
    floating buffers are averaged too: every peer's whole state_dict is the same after a round, the
    parameters are the exact mean of the peers' (outer lr 1, no momentum) and so are the running
    statistics. A parameter with requires_grad=False stays where it was (hivemind mode gave it a zero
    gradient, so the optimizer's weight decay moved it)."""
    n = 2

    def model():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        m[0].bias.requires_grad_(False)
        return m

    if mode == "diloco":
        config = lambda: dec.DecentralisedConfig(local_steps=2, outer_lr=1.0, outer_momentum=0.0,
                                                 matchmaking_window=5.0)
    else:
        config = lambda: dec.DecentralisedConfig(local_steps=None, target_batch_size=n * 8 * 2,
                                                 matchmaking_window=5.0)
    peers = []
    for i in range(n):
        m = model()
        p = dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.1), secret=b"s",
                     config=config(), initial_peers=[peers[0].address] if peers else None)
        p.start()
        peers.append(p)
    try:
        for p in peers:
            p.wait_for_peers(n - 1, timeout=30)
        before = {}
        run_round = dec.Peer.run_round

        def recording(self):
            before[self.peer_id] = {k: v.clone() for k, v in self.model.state_dict().items()}
            return run_round(self)

        shards = _shards(n, 2)

        def run(i):
            for s, (x, y) in enumerate(shards[i]):
                peers[i].train_step(x * (i + 1), y, F.cross_entropy)  # different statistics per peer
            while peers[i].stats.rounds < 1 and not peers[i].run_round():
                pass

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dec.Peer, "run_round", recording)
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert [p.stats.rounds for p in peers] == [1] * n
        states = [p.model.state_dict() for p in peers]
        pre = [before[p.peer_id] for p in peers]
        assert not torch.equal(pre[0]["1.running_mean"], pre[1]["1.running_mean"])  # the peers' data differ
        for key in ("1.running_mean", "1.running_var") + (("1.weight", "3.weight") if mode == "diloco" else ()):
            mean = torch.stack([b[key] for b in pre]).mean(0)
            for state in states:
                torch.testing.assert_close(state[key], mean, rtol=1e-6, atol=1e-6), key
        for key in states[0]:
            if states[0][key].is_floating_point():
                assert all(torch.equal(states[0][key], s[key]) for s in states[1:]), key
        assert all(torch.equal(s["0.bias"], model()[0].bias) for s in states)
    finally:
        for p in peers:
            p.close()


def test_unreachable_initial_peers_are_a_warning(caplog):
    """Initial peers given and none of them answering (a typo, a peer not up) used to start the
    peer alone without a word; now a warning names them."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        m = _model()
        with caplog.at_level("WARNING", logger="disttrain.decentralised"):
            with dec.Peer(m, torch.optim.SGD(m.parameters(), lr=0.1), secret=b"s", initial_peers=address) as peer:
                started = time.monotonic()
                peer.start(join_timeout=1.0)  # the wait for an answer (15 s by default) stays within it
                assert peer.live_peers() == [] and time.monotonic() - started < 10
    assert any("none of the initial peers" in r.getMessage() and address in r.getMessage() for r in caplog.records)


def test_a_peer_left_out_for_nan_is_told(caplog):
    """A peer whose parameters became NaN was rejected and left out of all later rounds by the
    others, and itself learnt nothing of it: no warning, no rejection, it trained on alone. Now
    the leader's reply says so, the peer warns once and Peer.left_out is True."""
    config = lambda: dec.DecentralisedConfig(local_steps=2, matchmaking_window=2.0, round_timeout=5.0)
    peers = _start_peers(2, config)
    try:
        def run(i):
            g = torch.Generator().manual_seed(i)
            for s in range(8):
                x = torch.randn(8, 10, generator=g)
                if i == 1 and s == 3:
                    with torch.no_grad():
                        peers[1].params[0].fill_(float("nan"))
                peers[i].train_step(x, x[:, :3].argmax(1), F.cross_entropy)

        with caplog.at_level("WARNING", logger="disttrain.decentralised"):
            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert any("non-finite" in r for r in peers[0].rejections)
        assert peers[1].left_out and not peers[0].left_out
        told = [r for r in caplog.records if "left out of all rounds" in r.getMessage()]
        assert len(told) == 1, [r.getMessage() for r in caplog.records]
    finally:
        for p in peers:
            p.close()


def test_a_state_of_another_model_is_a_clear_error():
    """Joining peers that train another model (or resuming another model's peer.dtsnap) ended in
    load_state_dict's multi-line RuntimeError; now a one-line DecentralisedError says so."""
    first_model = _model()
    first = dec.Peer(first_model, torch.optim.SGD(first_model.parameters(), lr=0.1), secret=b"s")
    first.start()
    try:
        other = nn.Linear(4, 2)
        peer = dec.Peer(other, torch.optim.SGD(other.parameters(), lr=0.1), secret=b"s", initial_peers=first.address)
        try:
            with pytest.raises(dec.DecentralisedError, match="does not fit this model") as e:
                peer.start(join_timeout=20)
            assert "\n" not in str(e.value)
        finally:
            peer.close()
        with dec.Peer(other, torch.optim.SGD(other.parameters(), lr=0.1), secret=b"s") as alone:
            with pytest.raises(dec.DecentralisedError, match="does not fit this model"):
                alone.restore(first.state())
    finally:
        first.close()


def test_four_peers_on_a_slow_network_converge(tmp_path):
    """Four `disttrain train --strategy decentralised` peers in network namespaces joined by a
    wire with 50 ms one-way delay and 10 Mbit/s per link: each reaches 85% test accuracy on
    the embedded digits set; metrics.csv and peers.csv are written; bytes are counted."""
    from disttrain import netem

    if os.geteuid() != 0:
        pytest.fail("the namespace test needs root (CI runs as root)")
    with netem.Network(4, delay_ms=50, rate_mbit=10) as net:
        first = f"{net.hosts[0].address}:7070"
        procs = []
        for i, host in enumerate(net.hosts):
            argv = [sys.executable, "-m", "disttrain.cli", "train", "--strategy", "decentralised",
                    "--listen", f"{host.address}:7070", "-e", "3", "-b", "32", "--local-steps", "10",
                    "-lr", "0.05", "-s", str(tmp_path), "--save-name", f"peer{i}", "--no-progress",
                    "--wait-for-peers", "3",  # on a quiet machine a peer would finish before the others start
                    *([] if i == 0 else ["--initial-peers", first])]
            procs.append(net.popen(i, argv, env={**os.environ, "DISTTRAIN_PEER_SECRET": "netem test",
                                                 "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            if i == 0:
                time.sleep(1.0)
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
        stats = net.stats()
    for i in range(4):
        peers = list(map(str.split, open(tmp_path / f"peer{i}" / "peers.csv").read().splitlines()))
        last = dict(zip(peers[0][0].split(","), peers[-1][0].split(",")))
        assert float(last["test_acc"]) > 0.85, last
        assert int(last["rounds"]) >= 5 and float(last["mean_group_size"]) > 2.5, last
        assert (tmp_path / f"peer{i}" / "metrics.csv").exists()
    assert all(sent > 0 for sent in stats["sent"]), stats
