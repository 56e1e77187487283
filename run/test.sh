#!/usr/bin/env bash
# The test suite: sets up .venv/ (run/setup.sh) then runs pytest.
# Extra arguments go to pytest, e.g. `bash run/test.sh -k balanced`,
# `bash run/test.sh tests/test_routers.py`, or `bash run/test.sh -m slow` for the
# slow experiments, left out unless a -m is given.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
case " $* " in
  *" -m "*) ;;
  *) set -- -m "not slow" "$@" ;;
esac
exec "$ROOT/.venv/bin/python" -m pytest "$@"  # pytest.ini: testpaths = tests
