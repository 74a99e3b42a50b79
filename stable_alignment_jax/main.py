"""Trains one stage (or baseline) from an ml_collections config file.

  python -m stable_alignment_jax.main --config=configs/stage3.py
  python -m stable_alignment_jax.main --config=configs/stage1.py:tiny --config.optim.lr=1e-3

On a multi-host TPU pod or GPU cluster run the same command on every host; JAX's distributed
runtime is initialised from the environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID) before anything touches a device.

Starting from a Hugging Face model (`--config.checkpoint.init_from=DIR_OR_HUB_ID`) takes
config.model from its config.json and, unless given, its tokenizer: the `--config.model.X`
flags typed on the command line are the only model fields that count as the user's, and each
must agree with the file (see `checkpoints.fill_model_from_init`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from stable_alignment_jax import runtime


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage1.py:tiny")
  runtime.init_distributed()
  runtime.enable_compilation_cache()
  import jax
  from stable_alignment_jax import train
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  # The keys typed as --config.a.b=... (not those the config file set): an HF init_from fills
  # every other model field from its config.json.
  train.check_config(config, explicit=config_flags.get_override_values(flags.FLAGS["config"]))
  if jax.process_index() == 0:
    print(config, flush=True)
  summary = train.run(config)
  if jax.process_index() == 0:
    final = {k: round(v, 4) for k, v in summary["final"].items()}
    print(f"[{config.checkpoint.dir}] finished {summary['steps']} steps: {final}", flush=True)


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/stage1.py or configs/stage1.py:tiny",
      lock_config=True)  # a typo in --config.x.y fails instead of adding a key
  app.run(main)


if __name__ == "__main__":
  cli()
