"""Baseline: SimPO (Meng et al. 2024), reference-free: the length-normalised log-probs of the
best and worst-rated response, a margin gamma between them.

  python -m stable_alignment_jax.main --config=configs/simpo.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "simpo"
  c.loss.beta = 2.0  # the paper's range is 2.0-2.5: a reward scale, not DPO's 0.1
  c.loss.simpo_gamma = 1.0  # gamma / beta = 0.5
  c.optim.lr = 5e-7  # DPO-like rates for 7-8B models
  c.checkpoint.dir = "runs/simpo"
  if arg.tiny:
    base.tiny(c, "simpo")
  return c
