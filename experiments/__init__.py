"""Experiments and benchmarks of lightning_adapters (not part of the installed package)."""
