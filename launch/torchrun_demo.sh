#!/usr/bin/env bash
# Distributed demo on CPU: 2 gloo ranks under DDP, NaN injected on rank 1 only; both ranks roll back together.
# Usage: bash launch/torchrun_demo.sh [NPROC] [extra demo args]   (run launch/demo.sh once first to set up)
set -euo pipefail
NPROC="${1:-2}"; shift || true
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
[ -x "$ROOT/.venv/bin/python" ] && source "$ROOT/.venv/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m gradience.demo --guard --inject-nan --inject-rank 1 "$@"
