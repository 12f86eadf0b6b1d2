"""Downstream evaluation on frozen encoders: cached features, MLP/linear probes, zero-shot."""
