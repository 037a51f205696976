#!/usr/bin/env bash
# Two-node demo on one machine, without Docker: docker/compose.yaml's node0 and node1 services, their exact
# commands, as two torchrun processes (--nnodes 2, static rendezvous at 127.0.0.1 on a free port), 1 gloo rank
# each (NPROC_PER_NODE=N for more); NaN injected on node1, every rank on both nodes rolls back.
# Logs: ./gradience_logs/two-node (or --logs DIR). Usage: bash launch/two_node_demo.sh [--logs DIR] [--print]
# On two real hosts, run the printed commands with --master_addr set to node 0's address (see docker/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
[ -x "$ROOT/.venv/bin/python" ] && source "$ROOT/.venv/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
exec python "$ROOT/docker/run_local.py" --profile two-node "$@"
