#!/usr/bin/env bash
# The test suite: sets up .venv/ (run/setup.sh) then runs pytest.
# With no arguments: every test but the slow experiments (what CI runs).
# Extra arguments go to pytest, e.g. `bash run/test.sh -k balanced` or
# `bash run/test.sh tests/test_routers.py`. Tiers (tests/conftest.py marks them):
#   bash run/test.sh -m unit           tests in the test process: a few minutes, for the edit-test loop
#   bash run/test.sh -m integration    tests that run fairseq's tools or several processes
#   bash run/test.sh -m slow           the slow experiments, left out unless the -m names them
# Tests run in 2 worker processes (pytest-xdist, a test file's tests in one worker);
# PYTEST_WORKERS=N sets how many, PYTEST_WORKERS=0 runs them in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# the slow experiments stay out unless the -m expression names them
args=() marked=
while [ $# -gt 0 ]; do
  if [ "$1" = "-m" ] && [ $# -gt 1 ]; then
    case "$2" in *slow*) args+=(-m "$2") ;; *) args+=(-m "($2) and not slow") ;; esac
    marked=1; shift 2
  else
    args+=("$1"); shift
  fi
done
[ -n "$marked" ] || args=(-m "not slow" "${args[@]}")
set -- "${args[@]}"
case " $* " in
  *" -n "*|*" -p no:xdist "*) ;;
  *) set -- -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ;;
esac
exec "$ROOT/.venv/bin/python" -m pytest "$@"  # pytest.ini: testpaths = tests
