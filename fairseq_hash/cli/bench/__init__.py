"""Benchmarks: ``fairseq-hash-bench`` (main.py) and its modes, and two benchmark modules."""
