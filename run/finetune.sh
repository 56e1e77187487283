#!/usr/bin/env bash
# The downstream demo: set up .venv/, then pretrain a dense and a hash-layer RoBERTa
# with masked_lm and fine-tune both on a classification task; compare test accuracy.
# Results go to outputs/finetune/ (--output-dir).
#   bash run/finetune.sh                                   # built-in corpus, default preset (not yet timed)
#   bash run/finetune.sh --preset tiny                     # < 5 min on 2 cores
#   bash run/finetune.sh --text x.txt --labels y.txt       # your own labelled lines
#   bash run/finetune.sh --help                            # all options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/python" -m fairseq_hash.cli.finetune "$@"
