"""Our command-line tools (tools.py lists them), grouped by what they do.

    data/         the text and data-bins they train on: fairseq-hash-prepare
    experiments/  train models alike and tabulate them: fairseq-hash-compare,
                  fairseq-hash-study, fairseq-hash-finetune (results.py: tables, plots)
    bench/        speed and memory: fairseq-hash-bench and two benchmark modules
    *.py          small tools (user-dir, help, table, report, upcycle, demo) and what
                  every tool uses: command.py (one-line errors), fairseq_runner.py
"""
