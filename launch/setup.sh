#!/usr/bin/env bash
# Source me: create/activate .venv and install Gradience from source with the extras named in $EXTRAS.
# torch is installed first and pinned (TORCH_SPEC), because an unpinned torch pulled in by another package
# resolves to a multi-GB CUDA build; on a GPU machine set TORCH_SPEC to the build you want.
# The editable install is skipped when .venv already holds it: a stamp in .venv records a hash of
# pyproject.toml, TORCH_SPEC, the checkout's path and Python, and the extras installed with it. A change to
# any of them (or extras not installed yet) reinstalls; GRADIENCE_REINSTALL=1 forces it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-hf}"
PYTHON="${PYTHON:-python3}"
STAMP="$ROOT/.venv/.gradience-install-stamp"
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
# "check" exits 0 when the stamp covers this install; "write" records it after a successful pip install.
_gradience_stamp() {
  # -I: not the checkout's own gradience.egg-info (sys.path[0] is the working directory), only .venv's.
  python -I - "$1" "$STAMP" "$ROOT" "$EXTRAS" "$TORCH_SPEC" <<'PY'
import hashlib, json, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
mode, stamp, root, extras, torch_spec = sys.argv[1:]
key = hashlib.sha256(b"\0".join([(Path(root) / "pyproject.toml").read_bytes(), torch_spec.encode(),
                                  root.encode(), sys.version.encode()])).hexdigest()
want = {e.strip() for e in extras.split(",") if e.strip()}
try:
    old = json.loads(Path(stamp).read_text())
    have = set(old["extras"]) if old["key"] == key else set()
    current = old["key"] == key
except (OSError, ValueError, KeyError, TypeError):
    have, current = set(), False
if mode == "check":
    try:
        version("gradience")  # the stamp outlives a `pip uninstall gradience`
    except PackageNotFoundError:
        sys.exit(1)
    sys.exit(0 if current and want <= have else 1)
# pip install -e .[hf] after .[hf,dev] leaves dev's packages installed: keep counting them.
Path(stamp).write_text(json.dumps({"key": key, "extras": sorted(want | have)}) + "\n")
PY
}
if [ "${GRADIENCE_REINSTALL:-0}" != 1 ] && _gradience_stamp check; then
  echo "setup: .venv already has gradience[$EXTRAS] with $TORCH_SPEC; skipping pip (GRADIENCE_REINSTALL=1 forces it)"
else
  python -m pip install -q -e "$ROOT[$EXTRAS]"
  python -c "import gradience, torch; print(f'gradience {gradience.__version__}, torch {torch.__version__}')"
  _gradience_stamp write
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" \
       MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
cd "$ROOT"
