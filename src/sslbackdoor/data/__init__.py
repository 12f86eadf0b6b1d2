"""Datasets, triggers and augmentations."""
