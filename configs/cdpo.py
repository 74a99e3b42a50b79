"""Baseline: conservative DPO (DPO with label smoothing: each preference taken as flipped with
probability loss.label_smoothing), otherwise configs/dpo.py.

  python -m stable_alignment_jax.main --config=configs/cdpo.py[:tiny]
"""

from configs import base, common, dpo


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = dpo.get_config()
  c.loss.label_smoothing = 0.1  # a common choice; society ratings are noisy labels
  c.checkpoint.dir = "runs/cdpo"
  if arg.tiny:
    base.tiny(c, "cdpo")
  return c
