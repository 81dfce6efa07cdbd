"""Experiments: one-off side-by-side GPU runs that decide between kernel variants."""
