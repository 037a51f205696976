#!/usr/bin/env bash
# Source me: create/activate .venv and install Gradience from source with the extras named in $EXTRAS.
# torch is installed first and pinned (TORCH_SPEC), because an unpinned torch pulled in by another package
# resolves to a multi-GB CUDA build; on a GPU machine set TORCH_SPEC to the build you want.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-hf}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
python - "$TORCH_SPEC" <<'PY' || python -m pip install -q "$TORCH_SPEC"
import sys
from importlib.metadata import PackageNotFoundError, version
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
try:
    have = version("torch").split("+")[0]
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or have == want else 1)
PY
python -m pip install -q -e "$ROOT[$EXTRAS]"
python -c "import gradience, torch; print(f'gradience {gradience.__version__}, torch {torch.__version__}')"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" \
       MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
cd "$ROOT"
