"""Baseline: IPO (Azar et al. 2023), best vs worst-rated response against the frozen starting
model; beta is the paper's tau, the log-ratios per token as TRL computes them.

  python -m stable_alignment_jax.main --config=configs/ipo.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "ipo"
  c.loss.beta = 0.1  # TRL's default tau
  c.optim.lr = 5e-7  # as the DPO baseline: both move away from the same reference
  c.checkpoint.dir = "runs/ipo"
  if arg.tiny:
    base.tiny(c, "ipo")
  return c
