"""Data: dataset sources (datasets.py) and batched loaders with the seeded split (loaders.py)."""
