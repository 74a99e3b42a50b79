"""RLHF baseline, part 2: PPO of the policy against the reward model of configs/reward.py.

  python -m stable_alignment_jax.main --config=configs/reward.py       # first: runs/reward
  python -m stable_alignment_jax.main --config=configs/ppo.py
  python -m stable_alignment_jax.main --config=configs/ppo.py:tiny     # CPU, programmatic reward
  python -m stable_alignment_jax.main --config=configs/ppo.py:society  # tiny pipeline (rlhf.py)

Paper-scale values are TRLX's PPO for its largest HH-RLHF policy (CarperAI/trlx
examples/hh/configs/ppo_hh_6B.yml, a 6B Pythia SFT model: the nearest TRLX config to LLaMA-7B).
TRLX sizes batches per process; the global sizes here are those x8 (one 8-accelerator host).
TRLX also freezes all but the top 2 layers (`num_layers_unfrozen: 2`); this trains every layer.
"""

import ml_collections

from configs import base, common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, society=False)
  c = base.get_config()
  c.method = "ppo"  # its blocks: c.ppo and c.reward below; no preference-loss block
  del c.loss
  # The prompts: HH-RLHF dialogues up to the last "Assistant:" (data_prep.hh_rlhf), as TRLX's
  # ppo_hh.py takes them; only `prompt` of each example is read.
  c.data.dataset = "hh_rlhf/all"
  c.data.eval_split = "test"

  c.ppo = ml_collections.ConfigDict()
  c.ppo.rollout_batch = 512  # TRLX num_rollouts: 64 per process
  c.ppo.minibatch = 32  # TRLX train.batch_size: 4 per process
  c.ppo.epochs = 4  # TRLX ppo_epochs: passes over each rollout batch
  c.ppo.max_prompt_len = 1952  # TRLX seq_length 2048 minus max_new_tokens (longer are dropped)
  c.ppo.max_new_tokens = 96  # TRLX gen_kwargs.max_new_tokens
  c.ppo.temperature = 1.0  # TRLX samples (do_sample, top_k 0, top_p 1.0): the plain policy
  c.ppo.top_k = 0
  c.ppo.top_p = 1.0
  c.ppo.init_kl_coef = 0.05  # TRLX init_kl_coef
  c.ppo.kl_target = 6.0  # TRLX target (nats per sequence; 0 = fixed coefficient)
  c.ppo.kl_horizon = 10000  # TRLX horizon
  c.ppo.gamma = 1.0  # TRLX gamma
  c.ppo.lam = 0.95  # TRLX lam (GAE lambda)
  c.ppo.cliprange = 0.2  # TRLX cliprange (policy ratio)
  c.ppo.cliprange_value = 0.2  # TRLX cliprange_value
  c.ppo.vf_coef = 1.0  # TRLX vf_coef
  c.ppo.cliprange_reward = 20.0  # TRLX cliprange_reward (the score is clipped to +-20)
  # TRLX scale_reward "running" (divide scores by a running std) is not implemented.

  c.reward = ml_collections.ConfigDict()
  c.reward.model = "runs/reward"  # a reward.py run directory; "" = the programmatic reward below
  c.reward.program = "token_count"  # programmatic rewards: ppo.PROGRAMS
  c.reward.tokens = (101,)  # token_count: the ids that earn 1 each
  c.reward.length_cost = 0.0  # token_count: subtracted per response token

  # TRLX: AdamW lr 8e-6, betas (0.9, 0.95), eps 1e-8, weight decay 1e-6, cosine annealing with
  # eta_min = lr (a constant rate).
  c.optim.lr = 8e-6
  c.optim.b2 = 0.95
  c.optim.weight_decay = 1e-6
  c.optim.warmup_ratio = 0.0
  c.optim.min_lr_ratio = 1.0
  # TRLX total_steps 6000 optimizer steps = 6000 / (epochs * rollout_batch / minibatch) = 94
  # iterations of rollout + update.
  c.train.steps = 94
  c.train.log_every = 1
  c.checkpoint.dir = "runs/ppo"
  c.checkpoint.init_from = ""  # the SFT policy (paper: an HH-SFT LLaMA); also PPO's pi_ref
  c.checkpoint.save_every = 10
  if arg.tiny:
    base.tiny(c, "ppo", steps=12)
    c.ppo.rollout_batch = 32
    c.ppo.minibatch = 8
    c.ppo.epochs = 2
    c.ppo.max_prompt_len = 80  # the synthetic prompts are ~65 bytes
    c.ppo.max_new_tokens = 16
    c.ppo.init_kl_coef = 0.02
    c.ppo.kl_target = 0.0
    c.reward.model = ""
    # Reward: lowercase letters earn 1, every token costs 0.1; a random tiny model starts
    # near 26/384 of them, so the rise is easy to see.
    c.reward.tokens = tuple(range(3 + ord("a"), 3 + ord("z") + 1))
    c.reward.length_cost = 0.1
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.0
    c.train.log_every = 1
    c.checkpoint.save_every = 4
  if arg.society:
    # The tiny pipeline's RLHF row (rlhf.run_baseline): its SANDBOX imitation prompts, the
    # society LM as policy and pi_ref, the reward model of configs/reward.py:society
    # (init_from, data.* and reward.model are the pipeline's). A handful of iterations; the
    # TRLX loss settings above are kept.
    base.tiny(c, "ppo_society", steps=8)
    c.model = common.tiny_world_model()
    c.data.source = "tfds"
    c.data.dataset = "sandbox_alignment/imitation"
    c.ppo.rollout_batch = 16
    c.ppo.minibatch = 8
    c.ppo.epochs = 2
    c.ppo.max_prompt_len = 128  # the Alpaca-wrapped world questions are ~100 pieces
    c.ppo.max_new_tokens = 48  # the society's replies are ~32 pieces (its drafts' cap)
    c.reward.model = "runs/reward_society"
    # The tiny stages train at 1e-3 with Adam; policy-gradient steps are noisier, so a third of
    # it (as DPO gets in the toy society). TRLX's 8e-6 is for a 6B model: at this size it left
    # the policy where it started (KL < 0.06 nats after 8 iterations, score flat).
    c.optim.lr = 3e-4
    c.optim.warmup_ratio = 0.0
    c.train.log_every = 1
    c.checkpoint.save_every = 4
  return c
