"""Sweep files for `python -m experiments.launch --sweep=...`."""
