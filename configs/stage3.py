"""Stage 3 (staged recipe, the paper): realignment (draft + feedback -> revision) with SA-CPO,
from Stage 2, with the imitation and self-critic data replayed.

  python -m stable_alignment_jax.main --config=configs/stage3.py
  python -m stable_alignment_jax.main --config=configs/stage3.py:replay=0   # the paper as written
  python -m stable_alignment_jax.main --config=configs/stage3.py:tiny   # after stage2.py:tiny

Replay: `replay` of every batch splits evenly between imitation (SA-CPO) and self-critic (SFT,
loss.by_kind) data, so the model keeps answering plain questions in the plain format and uses
the feedback-then-revision format only when asked to revise (common.REPLAY_SHARE).
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, replay=common.REPLAY_SHARE)
  c = base.get_config()
  c.data.dataset = "sandbox_alignment/realignment"
  c.data.mixture = common.replay_mixture("realignment", arg.replay)
  c.loss.name = "sa_cpo"
  c.checkpoint.dir = "runs/stage3"
  c.checkpoint.init_from = "runs/stage2"
  if arg.tiny:
    base.tiny(c, "stage3")
    c.checkpoint.init_from = "runs/stage2_tiny"
  return c
