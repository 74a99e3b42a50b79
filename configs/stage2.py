"""Stage 2 (staged recipe, the paper): self-critic data (peers' reasons for a draft) with SFT,
from Stage 1, with the imitation data replayed.

  python -m stable_alignment_jax.main --config=configs/stage2.py
  python -m stable_alignment_jax.main --config=configs/stage2.py:replay=0   # the paper as written
  python -m stable_alignment_jax.main --config=configs/stage2.py:tiny   # after stage1.py:tiny

Replay: `replay` (default common.REPLAY_SHARE) of every batch is imitation data, trained with
SA-CPO as in Stage 1, so the model keeps answering questions; without it, Stage 2 teaches the
model to critique whatever it is asked (common.REPLAY_SHARE says where that was measured). The
self-critic examples take SFT through loss.by_kind.
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, replay=common.REPLAY_SHARE)
  c = base.get_config()
  c.data.dataset = "sandbox_alignment/self_critic"
  c.data.mixture = common.replay_mixture("self_critic", arg.replay)
  c.loss.name = "sa_cpo"  # the replayed imitation data; self_critic -> sft (loss.by_kind)
  c.loss.sft_responses = "best"
  c.checkpoint.dir = "runs/stage2"
  c.checkpoint.init_from = "runs/stage1"
  if arg.tiny:
    base.tiny(c, "stage2")
    c.checkpoint.init_from = "runs/stage1_tiny"
  return c
