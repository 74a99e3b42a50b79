"""Batched KV-cache decoding (generate.py) and text in, text out (text_sampler.py). Imports model/,
data/, checkpoints/ and contracts; never training/ (import-linter checks)."""
