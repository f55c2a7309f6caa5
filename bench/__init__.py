"""Tabiji's benchmarks: `python -m bench NAME`, each printing ratios against a baseline of the same run."""
