"""Experiments that train models alike and tabulate them: compare, hash study, fine-tuning."""
