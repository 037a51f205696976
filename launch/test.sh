#!/usr/bin/env bash
# Fresh machine -> full test suite (unit, threaded gloo, multi-process and end-to-end launcher runs).
set -euo pipefail
EXTRAS=hf,dev source "$(dirname "$0")/setup.sh"
python -m pytest -q "$@"
