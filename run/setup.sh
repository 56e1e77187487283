#!/usr/bin/env bash
# Make .venv/ (Python 3.11) with the pinned dependencies and this project in
# editable mode. Idempotent: a second run only checks and returns in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.fairseq-hash-setup"
# Bump when run/constraints.txt or the installs below change, so existing venvs
# are brought up to date.
SETUP_VERSION=5

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "run/setup.sh: $PY not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "run/setup.sh: creating $VENV and installing pinned dependencies (about 5 minutes the first time)"
  "$PY" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SETUP_VERSION" ] \
   && "$VENV/bin/python" -c "import fairseq, fairseq_hash, fairscale, sentencepiece, xdist" 2>/dev/null; then
  exit 0
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_NO_WARN_SCRIPT_LOCATION=1
pip_install() {
  # some machines' pip config lists local package folders that may be absent;
  # pip warns about each one on every install, which hides real messages
  "${PIP[@]}" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade "pip<26" setuptools wheel
# every version below comes from run/constraints.txt
PINS=(-c "$ROOT/run/constraints.txt")
# torch first: the pinned CPU build; an open range would pull a multi-GB CUDA build.
pip_install "${PINS[@]}" torch numpy cython
# fairseq-fixed builds C++ extensions against the torch above (about 5 minutes,
# cached by pip afterwards).
pip_install "${PINS[@]}" --no-build-isolation fairseq-fixed hydra-core omegaconf torch numpy
pip_install "${PINS[@]}" fairscale --no-deps
pip_install "${PINS[@]}" sentencepiece matplotlib pytest pytest-xdist torch numpy
pip_install "${PINS[@]}" --no-build-isolation --no-deps -e "$ROOT"
echo "$SETUP_VERSION" > "$STAMP"
echo "run/setup.sh: environment ready in $VENV"
