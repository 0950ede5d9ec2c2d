"""Benchmarks of qemusnap against the booted test guest: run ``scripts/bench`` (see bench.py)."""
