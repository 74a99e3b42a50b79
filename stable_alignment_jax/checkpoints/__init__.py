"""Run directories, the one checkpoint format (run_dir.py, imported as `checkpoints`): save,
restore, and loading a model from any checkpoint kind. Imports model/ and data/ (the tokenizer);
never sampling or training."""
