"""Text in, examples and token batches out: tokenizers, prompt layouts and chat templates, example
sources (jsonl, TRL preference files, the synthetic set), length measurement and the grain
loader (loader.py). Imports only contracts."""
