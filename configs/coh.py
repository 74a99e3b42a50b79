"""Baseline: Chain-of-Hindsight, SFT on responses rewritten as good/bad feedback text.

  python -m stable_alignment_jax.main --config=configs/coh.py[:tiny]
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.loss.name = "sft"
  c.data.chain_of_hindsight = True
  c.data.num_responses = 1  # one templated feedback text per prompt
  c.checkpoint.dir = "runs/coh"
  if arg.tiny:
    base.tiny(c, "coh")
  return c
