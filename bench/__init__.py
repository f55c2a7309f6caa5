"""Tabiji's benchmarks: `python -m bench NAME`, each with ratios against a same-run baseline."""
