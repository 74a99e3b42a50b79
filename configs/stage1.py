"""Stage 1 (staged recipe, the paper): imitation learning on SANDBOX answers rated by
observers, with SA-CPO.

  python -m stable_alignment_jax.main --config=configs/stage1.py
  python -m stable_alignment_jax.main --config=configs/stage1.py:tiny   # CPU, about a minute
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, replay=common.REPLAY_SHARE)
  c = base.get_config()
  c.data.dataset = "sandbox_alignment/imitation"
  c.data.mixture = common.replay_mixture("imitation", arg.replay)  # the first stage: itself
  c.loss.name = "sa_cpo"
  c.checkpoint.dir = "runs/stage1"
  c.checkpoint.init_from = ""  # paper: starts from an HH-SFT LLaMA; give its HF dir here
  if arg.tiny:
    base.tiny(c, "stage1")
  return c
