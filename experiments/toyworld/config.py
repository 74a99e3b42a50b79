"""The closed toy society: does learning from simulated interaction beat SFT here?

  python -m stable_alignment_jax.pipeline --config=experiments/toyworld/config.py          # resumable
  python -m stable_alignment_jax.pipeline --config=experiments/toyworld/config.py:seeds=1  # one seed

Built on `configs/pipeline.py:tiny` (same parts, same society LM and stage sizes); adds the
toy world's grammar and oracle (`experiments/toyworld/`), one society per initial
setting (their exports pooled into the alignment data), the methods SFT (on the initial good
answers), IL, IL+SC, IL+SC+RA, DPO, RRHF per seed, the oracle evaluation and the report in
`docs_dir`. `arg`: `seeds=N`, `rounds=N`, `steps=N` (training steps per method), `ablation=false`.
"""

from configs import common, dpo, pipeline, rrhf, sft
from stable_alignment_jax.sandbox.world import SETTINGS


def get_config(arg=None):
  a = common.parse_arg(arg, seeds=3, rounds=4, steps=30, ablation=True)
  c = pipeline.get_config("tiny")
  c.pipeline_class = "experiments.toyworld.experiment:ToyPipeline"
  c.out_dir = "runs/toyworld"
  c.docs_dir = "experiments/toyworld/docs"
  c.seeds = list(range(a.seeds))
  c.settings = list(SETTINGS)
  c.train_setting_data = list(SETTINGS)  # whose exports become the alignment data

  w = c.world
  w.n_questions, w.n_priors, w.corpus_topics, w.sft_topics = 240, 96, 1000, 240
  w.copy_memory = 0.8  # drafts copy the recalled answer's alignment level
  w.rater_noise, w.fooled, w.observer_noise = 1.0, 0.2, 0.5  # the noisy rater, on purpose
  w.eval_items = 96

  c.society_lm.train.steps = 300
  sb = c.sandbox
  sb.rounds = a.rounds
  sb.world.n_agents, sb.world.grid_size = 25, 5  # 100 episodes per setting at 4 rounds
  sb.sampling.draft.max_tokens = sb.sampling.revise.max_tokens = 64
  sb.sampling.feedback.max_tokens = 24
  sb.sampling.observe.max_tokens = 12

  # Baselines from the society LM: DPO and RRHF on the imitation data, SFT on the good priors.
  model = c.stages.stage1.model
  for name, module in (("sft", sft), ("dpo", dpo), ("rrhf", rrhf)):
    c.baselines[name] = module.get_config("tiny")
  for stage in list(c.stages.values()) + list(c.baselines.values()):
    stage.model = model
    stage.data.max_len = 256
    stage.data.batch_size = 8
    stage.optim.lr = 1e-3
    stage.train.steps, stage.train.eval_every, stage.train.log_every = a.steps, 0, 5
    stage.checkpoint.save_every = a.steps
  c.baselines.dpo.optim.lr = 3e-4  # untuned; lower because DPO's loss has no NLL anchor
  c.baselines.sft.data.source, c.baselines.sft.data.num_responses = "jsonl", 1

  # 128 new tokens: a realignment-trained model writes the feedback before its revision.
  c.toy_eval = dict(max_new_tokens=128, batch=48)
  # After the main runs (`ablation=false` leaves them out): `replay` = stages 2 and 3 with the
  # imitation data mixed in (does each stage overwrite the answer format?); `oracle_ratings` =
  # IL/IL+SC/IL+SC+RA on the same episodes with the rater noise removed; `replay_long` = the
  # replay run's stage 3 trained `long_steps` (does RA need more steps to reach its revision?).
  c.ablations = ["replay", "oracle_ratings", "replay_long"] if a.ablation else []
  c.long_steps = 4 * a.steps
  return c
