"""Trains what an ml_collections config file says: its `config.method` (a preference stage or
baseline, a reward model, or PPO), each on the one training scaffold (scaffold.py).

  python -m stable_alignment_jax.main --config=configs/stage3.py
  python -m stable_alignment_jax.main --config=configs/stage1.py:tiny --config.optim.lr=1e-3
  python -m stable_alignment_jax.main --config=configs/reward.py:tiny
  python -m stable_alignment_jax.main --config=configs/ppo.py:tiny

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


# config.method -> the module that trains it (its `run(config)`).
METHODS = {"preference": "stable_alignment_jax.training.train",
           "reward": "stable_alignment_jax.training.reward",
           "ppo": "stable_alignment_jax.training.ppo"}


def method_of(config) -> str:
  """config.method, or a one-line UsageError naming the methods (a config without one is a
  preference stage: every config file before methods had a name)."""
  method = config.get("method", "preference")
  if method not in METHODS:
    raise app.UsageError(f"config.method={method!r} is not a training method; known: "
                         f"{sorted(METHODS)}. Datasets, evaluation and SANDBOX have their own "
                         "commands: python -m data_prep, eval.run, stable_alignment_jax.sandbox")
  return method


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage1.py:tiny")
  method = method_of(config)
  runtime.init_distributed()
  runtime.enable_compilation_cache()
  import importlib
  import jax
  trainer = importlib.import_module(METHODS[method])
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if method == "preference":
    # The keys typed as --config.a.b=... (not those the config file set): an HF init_from
    # fills every other model field from its config.json.
    trainer.check_config(config,
                         explicit=config_flags.get_override_values(flags.FLAGS["config"]))
  if jax.process_index() == 0:
    print(config, flush=True)
  summary = trainer.run(config)
  if jax.process_index() == 0:
    final = summary["history"][-1] if method == "ppo" and summary["history"] else \
        summary.get("final", {})
    final = {k: round(v, 4) for k, v in final.items() if isinstance(v, (int, float))}
    print(f"[{config.checkpoint.dir}] {method}: finished at step "
          f"{summary.get('steps', config.train.steps)}: {final}", flush=True)


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
