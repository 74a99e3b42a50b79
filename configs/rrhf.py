"""Baseline: RRHF, pairwise ranking of length-normalised log-probs + NLL of the best.

  python -m stable_alignment_jax.main --config=configs/rrhf.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "rrhf"
  c.checkpoint.dir = "runs/rrhf"
  if arg.tiny:
    base.tiny(c, "rrhf")
  return c
