"""Stage 3: realignment (draft + feedback -> revision) with SA-CPO, from Stage 2.

  python -m stable_alignment_jax.main --config=configs/stage3.py
  python -m stable_alignment_jax.main --config=configs/stage3.py:tiny   # after stage2.py:tiny
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.data.dataset = "sandbox_alignment/realignment"
  c.loss.name = "sa_cpo"
  c.checkpoint.dir = "runs/stage3"
  c.checkpoint.init_from = "runs/stage2"
  if arg.tiny:
    base.tiny(c, "stage3")
    c.checkpoint.init_from = "runs/stage2_tiny"
  return c
