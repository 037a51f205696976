#!/usr/bin/env bash
# Fresh machine -> full test suite (unit, threaded gloo, multi-process and end-to-end launcher runs).
set -euo pipefail
EXTRAS=hf,dev,deepspeed source "$(dirname "$0")/setup.sh"
# DeepSpeed compiles a comm op on its first start (~2 min on 2 cores): keep it for later runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.cache/torch_extensions}"
python -m pytest -q "$@"
