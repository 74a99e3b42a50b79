"""Baseline: SFT on the best-rated response of each imitation prompt.

  python -m stable_alignment_jax.main --config=configs/sft.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "sft"
  c.checkpoint.dir = "runs/sft"
  if arg.tiny:
    base.tiny(c, "sft")
  return c
