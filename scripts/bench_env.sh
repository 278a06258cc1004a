#!/usr/bin/env bash
# The benchmark-only environment of `disttrain bench decentralised` (issue 16):
# hivemind (the reference system, its PyPI wheel carries the p2p daemon p2pd)
# in a virtual environment of its own, never a dependency of disttrain; and the
# peers of `disttrain bench snapshot --peers` and `disttrain bench resume
# --peers` (issue 23): torchsnapshot and torchdata (StatefulDataLoader); and
# torchft, the peer of `disttrain bench fault --peers torchft` (its wheel carries
# the Rust lighthouse, torchft_lighthouse, and runs on CPU over gloo).
#
# The venv sees the system's packages (--system-site-packages): the same torch
# and the installed disttrain (for its data set and models). hivemind is
# installed without its dependency resolution (--no-deps) and its other
# requirements are listed here without torch, under a constraint that pins
# torch to the system's version, so pip never resolves a torch of its own.
#
# Usage: scripts/bench_env.sh [VENV]   (default /opt/disttrain-bench-venv, or $DISTTRAIN_BENCH_VENV)
set -euo pipefail

VENV=${1:-${DISTTRAIN_BENCH_VENV:-/opt/disttrain-bench-venv}}
HIVEMIND_VERSION=1.1.12
# hivemind 1.1.12's Requires-Dist, torch left out (the system's torch satisfies torch>=1.9.0).
HIVEMIND_REQUIREMENTS=(PyYAML "numpy>=1.17" "scipy>=1.2.1" "prefetch_generator>=1.0.1" "msgpack>=0.5.6"
  sortedcontainers "uvloop>=0.14.0" "grpcio-tools>=1.33.2" "protobuf>=5.29.0" "configargparse>=1.2.3"
  "py-multihash>=0.2.3" "cryptography>=3.4.6" "pydantic>=2.0.0" "packaging>=20.9" "varint>=1.0.2"
  "base58>=1.0.2" "netaddr>=1.3.0" "idna>=3.10" "py-cid>=0.3.0")

TORCHSNAPSHOT_VERSION=0.1.0
TORCHDATA_VERSION=0.11.0
TORCHFT_VERSION=0.2.0
# Their Requires-Dist, torch left out (torchsnapshot: torch; torchdata: torch>=2).
PEER_REQUIREMENTS=(PyYAML aiofiles aiohttp importlib-metadata nest-asyncio psutil typing-extensions
  "urllib3>=1.25" requests)
# torchft 0.2.0's Requires-Dist, torch left out.
TORCHFT_REQUIREMENTS=(opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http)

SYSTEM_PYTHON=${PYTHON:-python3}
TORCH_VERSION=$("$SYSTEM_PYTHON" -c "import torch; print(torch.__version__)")
TORCH_FILE=$("$SYSTEM_PYTHON" -c "import torch; print(torch.__file__)")

"$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q --no-deps "hivemind==$HIVEMIND_VERSION"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "${HIVEMIND_REQUIREMENTS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps "torchsnapshot==$TORCHSNAPSHOT_VERSION" "torchdata==$TORCHDATA_VERSION"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "${PEER_REQUIREMENTS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps "torchft==$TORCHFT_VERSION"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "${TORCHFT_REQUIREMENTS[@]}"

# The venv's torch must be the system's, and hivemind must import with its daemon.
"$VENV/bin/python" - "$TORCH_FILE" <<'PY'
import os, sys
import torch, hivemind, torchsnapshot, torchft
from torchft import Manager, ProcessGroupGloo
from torchdata.stateful_dataloader import StatefulDataLoader
from hivemind.p2p.p2p_daemon import P2P
assert torch.__file__ == sys.argv[1], f"the bench venv has a torch of its own: {torch.__file__}"
daemon = os.path.join(os.path.dirname(hivemind.__file__), "hivemind_cli", "p2pd")
assert os.access(daemon, os.X_OK), f"hivemind's p2p daemon is missing: {daemon}"
lighthouse = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
assert os.access(lighthouse, os.X_OK), f"torchft's lighthouse is missing: {lighthouse}"
print(f"bench venv ready: hivemind {hivemind.__version__}, torchsnapshot, torchdata, torchft, torch {torch.__version__} (the system's)")
PY
echo "$VENV/bin/python"
