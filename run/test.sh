#!/usr/bin/env bash
# The test suite: sets up .venv/ (run/setup.sh) then runs pytest.
# Extra arguments go to pytest, e.g. `bash run/test.sh -k balanced`,
# `bash run/test.sh tests/test_routers.py`, or `bash run/test.sh -m slow` for the
# slow experiments, left out unless a -m is given. Tests run in 2 worker processes
# (pytest-xdist, a test file's tests in one worker); PYTEST_WORKERS=N sets how many,
# PYTEST_WORKERS=0 runs them in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
case " $* " in
  *" -m "*) ;;
  *) set -- -m "not slow" "$@" ;;
esac
case " $* " in
  *" -n "*|*" -p no:xdist "*) ;;
  *) set -- -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ;;
esac
exec "$ROOT/.venv/bin/python" -m pytest "$@"  # pytest.ini: testpaths = tests
