"""Stage 2: self-critic data (peers' reasons for a draft) with plain SFT, from Stage 1.

  python -m stable_alignment_jax.main --config=configs/stage2.py
  python -m stable_alignment_jax.main --config=configs/stage2.py:tiny   # after stage1.py:tiny
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.data.dataset = "sandbox_alignment/self_critic"
  c.loss.name = "sft"
  c.loss.sft_responses = "best"
  c.checkpoint.dir = "runs/stage2"
  c.checkpoint.init_from = "runs/stage1"
  if arg.tiny:
    base.tiny(c, "stage2")
    c.checkpoint.init_from = "runs/stage1_tiny"
  return c
