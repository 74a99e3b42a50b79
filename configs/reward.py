"""RLHF baseline, part 1: a reward model (our LLaMA + a scalar head) on preference pairs.

  python -m stable_alignment_jax.main --config=configs/reward.py          # HH-RLHF pairs
  python -m stable_alignment_jax.main --config=configs/reward.py:sandbox  # SANDBOX groups
  python -m stable_alignment_jax.main --config=configs/reward.py:tiny     # CPU, a minute
  python -m stable_alignment_jax.main --config=configs/reward.py:society  # tiny pipeline

The run directory is PPO's `reward.model` (configs/ppo.py).
"""

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, sandbox=False, society=False)
  arg.sandbox = arg.sandbox or arg.society
  c = base.get_config()
  # The reward model: -log sigmoid(r_better - r_worse) over every rated pair (reward.py); no
  # preference-loss block.
  c.method = "reward"
  del c.loss
  if arg.sandbox:
    # Imitation groups: one prompt, K answers rated by observers; all differently rated pairs.
    c.data.dataset = "sandbox_alignment/imitation"
    c.data.num_responses = 3
  else:
    # data_prep.hh_rlhf: prompt + [chosen, rejected] rated [1, 0]; its held-out split is "test".
    c.data.dataset = "hh_rlhf/all"
    c.data.eval_split = "test"
    c.data.num_responses = 2
  # InstructGPT's reward model (Ouyang et al. 2022, App. C.2): a single epoch (more overfits),
  # lr 9e-6 with a cosine schedule down to 10% of it, batch 64 comparisons' prompts.
  c.data.batch_size = 64
  c.train.epochs = 1.0
  c.optim.lr = 9e-6
  c.optim.min_lr_ratio = 0.1
  c.optim.warmup_ratio = 0.0
  c.train.eval_every = 500
  c.train.eval_batches = 50
  # > 0: this fraction of the train split (seeded) is the held-out set instead of eval_split.
  c.train.eval_holdout = 0.0
  c.checkpoint.dir = "runs/reward"
  c.checkpoint.init_from = ""  # the SFT model the policy starts from (paper: an HH-SFT LLaMA)
  if arg.tiny:
    base.tiny(c, "reward", steps=60)
    c.data.batch_size = 16
    c.data.num_responses = 3
    c.optim.lr = 1e-3
    c.train.eval_every = 60
    c.train.eval_batches = 2
    c.checkpoint.save_every = 30
  if arg.society:
    # The tiny pipeline's RLHF row (rlhf.run_baseline): the stages' sizes (configs/pipeline.py
    # :tiny) on its SANDBOX imitation groups, from the society LM (init_from and data.* are
    # the pipeline's). ~20-80 prompts: 60 steps of 8 are a few epochs, enough for the
    # rated-phrase preference; the export's validation split may hold no rated pair, so a
    # fifth of the train split is held out instead.
    base.tiny(c, "reward_society", steps=60)
    c.model = common.tiny_world_model()
    c.data.source = "tfds"
    c.data.dataset = "sandbox_alignment/imitation"
    c.data.num_responses = 3
    c.data.max_len = 256
    c.data.batch_size = 8
    c.optim.lr = 3e-4  # held-out margin ~1.9 on the tiny pipeline's groups (1e-4: ~0.6)
    c.optim.warmup_ratio = 0.1
    c.train.eval_holdout = 0.2
    c.train.eval_every = 30
    c.train.eval_batches = 4
    c.train.log_every = 10
    c.checkpoint.save_every = 20
  return c
