#!/usr/bin/env bash
# The paper's hash study on the built-in corpus or your text files: one small LM
# per hash type (and MultiHash, and no hash layer), then a markdown table of
# valid/test perplexity and load, and a plot of validation perplexity.
#   bash run/hash_study.sh                      # about 30 minutes on 2 CPU cores
#   bash run/hash_study.sh --quick              # smoke test, a few minutes
#   bash run/hash_study.sh a.txt b.txt --updates 2000 --experts 16 --embed-dim 256
# All flags: bash run/hash_study.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/fairseq-hash-study" "$@"
