"""Baseline: DPO, best vs worst-rated response, against the frozen starting model.

  python -m stable_alignment_jax.main --config=configs/dpo.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "dpo"
  c.loss.beta = 0.1
  c.optim.lr = 5e-7  # DPO paper's learning rate for 7B-scale models
  c.checkpoint.dir = "runs/dpo"
  if arg.tiny:
    base.tiny(c, "dpo")
  return c
