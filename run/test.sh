#!/usr/bin/env bash
# The test suite: sets up .venv/ (run/setup.sh) then runs pytest.
# Extra arguments go to pytest, e.g. `bash run/test.sh -k balanced` or
# `bash run/test.sh -m slow` for the slow experiments left out by default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
