"""Experiments and demo worlds built on the library (its public functions only)."""
