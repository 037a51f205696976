#!/usr/bin/env bash
# Fresh machine -> guarded demo: tiny GPT-2, NaN injected at step 50, one rollback. Extra args go to the demo.
set -euo pipefail
EXTRAS=hf source "$(dirname "$0")/setup.sh"
python -m gradience.demo --guard --inject-nan "$@"
