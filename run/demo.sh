#!/usr/bin/env bash
# The main job: set up .venv/, then train and evaluate a small hash-layer LM.
#   bash run/demo.sh                    # built-in corpus (Python's docstrings)
#   bash run/demo.sh a.txt b.txt        # your own text files
#   bash run/demo.sh --help             # all options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/fairseq-hash-demo" "$@"
