"""Benchmarks of causal against TransformerLens and a naive hook loop (`python benchmarks/sweep.py`)."""
