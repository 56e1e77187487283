#!/usr/bin/env bash
# The downstream demo: set up .venv/, then pretrain dense and hash-layer models alike and
# fine-tune them (and the upcycled dense one) on a classification task (RoBERTa) and a
# next-utterance seq2seq task (transformer); compare test accuracy, perplexity and BLEU.
# Results go to outputs/finetune/ (--output-dir).
#   bash run/finetune.sh                                   # built-in corpus, default preset (not yet timed)
#   bash run/finetune.sh --preset tiny                     # under 5 min on 2 cores
#   bash run/finetune.sh --text x.txt --labels y.txt       # your own labelled lines
#   bash run/finetune.sh --help                            # all options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run/setup.sh"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/fairseq-hash-finetune" "$@"
