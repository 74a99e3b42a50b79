"""Baseline: ORPO (Hong et al. 2024), reference-free: SFT on the best-rated response plus
lambda (config.loss.beta, TRL's name) times the odds-ratio term against the worst-rated one.

  python -m stable_alignment_jax.main --config=configs/orpo.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "orpo"
  c.loss.beta = 0.1  # lambda; TRL's default
  c.optim.lr = 5e-6  # ORPO replaces SFT, so it trains at an SFT-like rate, not DPO's
  c.checkpoint.dir = "runs/orpo"
  if arg.tiny:
    base.tiny(c, "orpo")
  return c
