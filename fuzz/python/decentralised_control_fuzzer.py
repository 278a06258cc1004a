"""atheris target: the decentralised strategy's control messages
(``disttrain.strategies.decentralised``: ``_recv_frame`` and ``Peer._handle``).

One Peer (a tiny model, never started: no heartbeats, no other peer) serves
each input on one end of a socket pair, as its control server would. Byte 0
is a mode. Even: the rest is the raw byte stream of the connection. Odd: the
rest is a message body, framed with its length and the HMAC of the job's
control key, so mutations reach the JSON handling behind the signature.
``_handle`` must answer, reject (recorded in ``rejections``) or drop the
connection; an exception out of it or a wait past its timeouts is a crash."""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch

from disttrain.strategies import decentralised

_SECRET = b"fuzz secret"
_CONFIG = decentralised.DecentralisedConfig(matchmaking_window=0.05, round_timeout=0.5,
                                            heartbeat_interval=0.1, peer_timeout=0.3)
_peer: decentralised.Peer | None = None
logging.getLogger("disttrain.decentralised").setLevel(logging.ERROR)  # each rejection is logged otherwise


def _the_peer() -> decentralised.Peer:
    global _peer
    if _peer is None:
        model = torch.nn.Linear(2, 2)
        _peer = decentralised.Peer(model, torch.optim.SGD(model.parameters(), lr=0.1), secret=_SECRET,
                                   config=_CONFIG, peer_id="fuzz-peer")
    return _peer


def test_one_input(data: bytes) -> None:
    if not data:
        return
    peer = _the_peer()
    if data[0] % 2 == 0:
        stream = data[1:]
    else:
        body = data[1:]
        stream = decentralised._FRAME.pack(len(body), decentralised.hmac.new(
            peer._control_key, body, decentralised.hashlib.sha256).digest()) + body
    server, client = socket.socketpair()
    with server, client:
        def feed() -> None:
            try:
                client.sendall(stream)
                client.shutdown(socket.SHUT_WR)
                while client.recv(1 << 16):  # drain the answers
                    pass
            except OSError:
                pass  # the peer closed the connection: allowed
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        start = time.monotonic()
        peer._handle(server, ("fuzz", 0))
        server.shutdown(socket.SHUT_RDWR)
        feeder.join(5)
        if feeder.is_alive():
            raise RuntimeError("the control connection was never closed")
        took = time.monotonic() - start
        if took > 3 * _CONFIG.round_timeout + 1:
            raise RuntimeError(f"one control message held the peer for {took:.1f} s")
    del peer.rejections[:]

