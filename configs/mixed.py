"""The authors' released recipe (agi-templar/Stable-Alignment): one run on the three kinds mixed,
one loss, no stages.

  python -m stable_alignment_jax.main --config=configs/mixed.py --config.checkpoint.init_from=X
  python -m stable_alignment_jax.main --config=configs/mixed.py:tiny

Facts from the release: collect_data.py samples self-critic and realignment data relative to the
imitation data (README: 5:1:1) and concatenates them into one file; alignment.py trains it in
one run with the token-mean NLL of the best-rated response plus `ratio` x one hinge applied after
averaging the differences to the other responses (loss.hinge = "after_aggregate"), margins scaled
by rating differences. Each prompt's group holds one kind; the self-critic and realignment prompts
end with their instructions, so the model learns to condition on them. The same loss trains every
kind (loss.by_kind empty). An epoch is one pass over the imitation data (data.dataset), i.e.
7/5 of the mixture's draws at 5:1:1.
"""

import ml_collections

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, ratio="5:1:1")
  c = base.get_config()
  weights = [float(w) for w in arg.ratio.split(":")]
  if len(weights) != 3:
    raise ValueError(f"ratio={arg.ratio!r}: expected imitation:self_critic:realignment")
  c.data.dataset = "sandbox_alignment/imitation"
  c.data.mixture = ml_collections.ConfigDict(
      {kind: {"dataset": f"sandbox_alignment/{kind}", "weight": w}
       for kind, w in zip(common.STAGE_KINDS, weights)})
  c.loss.name = "sa_cpo"
  c.loss.hinge = "after_aggregate"
  c.loss.by_kind = ml_collections.ConfigDict()
  c.checkpoint.dir = "runs/mixed"
  c.checkpoint.init_from = ""  # the same start as Stage 1 (paper: an HH-SFT LLaMA)
  if arg.tiny:
    base.tiny(c, "mixed")
  return c
