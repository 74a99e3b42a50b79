"""The closed toy society: does learning from simulated interaction beat SFT and RLHF here?

  python -m stable_alignment_jax.recipes.pipeline --config=experiments/toyworld/config.py
  python -m stable_alignment_jax.recipes.pipeline --config=experiments/toyworld/config.py:seeds=1
  (resumable; the second runs one seed)

Built on `configs/pipeline.py:tiny` (same parts, same society LM and stage sizes); adds the
toy world's grammar and oracle (`experiments/toyworld/`). A seed reruns the society itself: every
setting's SANDBOX runs with that seed (agents, priors, who talks to whom, sampling), its exports
are pooled into that seed's alignment data, and every method trains on it with that seed. The
society LM is trained once and shared (it is the start of every method, as base_model is).
Per seed: SFT (on the initial good answers), DPO (the imitation groups' rated pairs), IL, IL
step-matched to IL+SC+RA (same total steps and lr schedule), then IL+SC and IL+SC+RA both as the
paper writes them (no replay) and with the default replay, the authors' mixed 5:1:1 run, and PPO
against a reward model trained on the society's ratings; then the oracle evaluation and the
report in `docs_dir`. `arg`: `seeds=N`, `rounds=N`, `steps=N` (training steps per method), `agents=N`.
"""

from configs import common, dpo, pipeline, sft
from stable_alignment_jax.sandbox.world import SETTINGS


def get_config(arg=None):
  a = common.parse_arg(arg, seeds=5, rounds=3, steps=20, agents=16)
  c = pipeline.get_config("tiny")
  c.pipeline_class = "experiments.toyworld.experiment:ToyPipeline"
  c.out_dir = "runs/toyworld"
  c.docs_dir = "experiments/toyworld/docs"
  c.seeds = list(range(a.seeds))
  # Two of the paper's four initial settings, both half good and half bad like the start
  # model's plain answers: the society shrunk so that every method, control and check of five
  # seeds fits the budget (the last run had all four settings).
  c.settings = ["half_half", "mixed_half_half"]
  c.train_setting_data = list(c.settings)  # whose exports become the alignment data

  w = c.world
  w.n_questions, w.n_priors, w.corpus_topics, w.sft_topics = 240, 96, 1000, 240
  w.copy_memory = 0.8  # drafts copy the recalled answer's alignment level
  w.rater_noise, w.fooled, w.observer_noise = 1.0, 0.2, 0.5  # the noisy rater, on purpose
  # The society's plain answers (good, evasive, bad), so the start model has room to improve.
  # Half misaligned (0.4, 0.1, 0.5), the paper's half_half, gave a start that answered only
  # 0.27 of the held-out questions misaligned greedy (0.44 sampled; parsed 0.83): greedy
  # decoding favours the aligned cores. Two thirds misaligned clears the 0.3.
  w.plain_levels = (0.25, 0.1, 0.65)
  w.eval_items = 64

  c.society_lm.train.steps = 300
  # The corpus's longest example (a revise prompt and its answer) runs to ~312 tokens of the
  # toy's 512-piece vocabulary: 320 trains every one whole, and every position the evaluation
  # and SANDBOX use.
  c.society_lm.data.max_len = 320
  sb = c.sandbox
  # 16 agents x 3 rounds per setting and seed (the last run had 25 x 4 for one shared society):
  # five societies per setting must fit the ~90 minute budget on 2 CPU cores.
  sb.rounds = a.rounds
  sb.world.n_agents, sb.world.grid_size = a.agents, 4
  # The longest answer the grammar writes is 87 tokens (an engaging one about a long topic):
  # 88 holds it and its end; 64 cut the longest drafts and revisions.
  sb.sampling.draft.max_tokens = sb.sampling.revise.max_tokens = 88
  sb.sampling.feedback.max_tokens = 24
  sb.sampling.observe.max_tokens = 12

  # The methods from the society LM; SFT on the good priors; DPO (the paper's strongest pairwise
  # baseline) on the imitation data. RRHF and CoH are left out of this run (time);
  # configs/pipeline.py keeps them.
  model = c.stages.stage1.model
  c.baselines = {"sft": sft.get_config("tiny"), "mixed": c.baselines.mixed,
                 "dpo": dpo.get_config("tiny")}
  for stage in list(c.stages.values()) + list(c.baselines.values()):
    stage.model = model
    # Every response whole: toy realignment rows run to ~296 tokens and self-critic ones to
    # ~275 (p99, the toy's 512-piece vocabulary); 256 lost a third of the realignment
    # examples and a quarter of the self-critic responses. 320 keeps them all, for ~35-40% more
    # step time than 256 on CPU.
    stage.data.max_len = 320
    stage.data.batch_size = 8
    stage.optim.lr = 1e-3
    # 20 steps a run (was 30): two settings give each seed about half the alignment data of
    # four, so 20 batches of 8 still pass over it several times, and ten trained runs per seed
    # (DPO and the step-matched IL added) fit the budget.
    stage.train.steps, stage.train.eval_every, stage.train.log_every = a.steps, 0, 5
    stage.checkpoint.save_every = a.steps
  c.baselines.sft.data.source, c.baselines.sft.data.num_responses = "jsonl", 1
  # PPO: 24 iterations of 16 rollouts, 2 epochs of 2 minibatches (96 updates; 384 sampled
  # answers, the stages see 240 prompts), against a reward model on the society's ratings.
  c.rlhf.ppo.train.steps = 24
  c.baselines.sft.data.mixture = {}

  # A whole realigned reply (a reason, the marker, the longest revision) is at most ~116 tokens:
  # 128 new tokens hold it, but never past position 320 (the trained max_len; the longest
  # revise prompt is ~201 tokens, so it keeps >= 119 for its own topic's reply). Greedy, and
  # sampled at temperature 0.7 (per-item seeds) for the plain questions. One batch of 64.
  c.toy_eval = dict(max_new_tokens=128, batch=64, temperature=0.7, positions=320)
  return c
