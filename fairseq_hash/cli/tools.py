"""Our command-line tools: each console script and the module whose ``main`` it runs.

setup.py makes the console scripts from this table, and ``run_fairseq`` runs a
tool as ``python -m MODULE``, so the two never disagree. This file imports
nothing: setup.py reads it without importing the package.
"""
TOOLS = {
    "fairseq-hash-user-dir": "fairseq_hash.cli.user_dir",
    "fairseq-hash-help": "fairseq_hash.cli.flags",
    "fairseq-hash-demo": "fairseq_hash.cli.demo",
    "fairseq-hash-table": "fairseq_hash.cli.hash_table",
    "fairseq-hash-report": "fairseq_hash.cli.report",
    "fairseq-hash-upcycle": "fairseq_hash.cli.upcycle",
    "fairseq-hash-consolidate": "fairseq_hash.cli.consolidate",
    "fairseq-hash-prepare": "fairseq_hash.cli.data.prepare",
    "fairseq-hash-bench": "fairseq_hash.cli.bench.main",
    "fairseq-hash-compare": "fairseq_hash.cli.experiments.compare",
    "fairseq-hash-study": "fairseq_hash.cli.experiments.hash_study",
    "fairseq-hash-finetune": "fairseq_hash.cli.experiments.finetune",
}
