"""The whole method in one run: SANDBOX -> data_prep -> Stage 1 -> 2 -> 3 (+ baselines) -> eval.

  python -m stable_alignment_jax.recipes.pipeline --config=configs/pipeline.py:tiny   # CPU, offline
  python -m stable_alignment_jax.recipes.pipeline --config=configs/pipeline.py \
      --config.base_model=/ckpt/llama-7b-hh-sft \
      --config.sandbox.backends.server.base_url=http://127.0.0.1:8000/v1

Each part keeps its own config (the same files the parts run from alone); the pipeline only
fills the paths that connect them (export -> datasets -> stage checkpoints -> eval) under
`out_dir`. Without `:tiny` it is the paper-scale run: 100 agents talking to an OpenAI-compatible
server, LLaMA-7B stages from `base_model` (the HH-SFT starting point, an HF or our run dir),
the SFT/DPO/RRHF/CoH baselines on the imitation data, and the six benchmarks with a judge.
`:peers` adds the IPO, SimPO, ORPO and conservative-DPO baselines (configs/ipo.py, ...).
With `:tiny` a project-written world (`experiments/tiny_world/`) first trains a
small society LM, so the agents' ratings parse and carry signal, and everything runs offline.

`:small=SPEC` runs the method at toy size on a real pretrained chat model (an HF directory or hub
id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct): 9 agents of that model talk in-process for 2
rounds over the HH-RLHF questions and priors (ratings read as choices over 1..7, prompts in the
model's chat template), then a few steps of each stage and an SFT baseline start from it, with
`config.model` and the tokenizer filled from the checkpoint, and two MC benchmarks score them.
"""

import ml_collections

from configs import (cdpo, common, coh, dpo, ipo, mixed, orpo, ppo, reward, rrhf, sandbox, sft,
                     simpo, stage1, stage2, stage3)
from configs import eval as eval_config
from stable_alignment_jax import contracts

DATASETS = contracts.STAGE_KINDS


def _train_cfg(module, tiny: bool):
  return module.get_config("tiny" if tiny else None)


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, small="", replay=common.REPLAY_SHARE, ppo=True,
                       peers=False)
  if a.small:
    return _small(a.small, a.replay)
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/pipeline_tiny" if a.tiny else "runs/pipeline"
  c.seed = 0
  c.base_model = ""  # the checkpoint Stage 1 starts from (paper: LLaMA-7B after HH SFT)

  # Tiny only: the embedded world and the small LM its society runs on.
  # `write` names the function that writes the world's files (see stable_alignment_jax/plugins.py).
  c.world = ml_collections.ConfigDict(dict(enabled=a.tiny, n_questions=64, n_priors=64,
                                           corpus_topics=600, vocab_size=512,
                                           write="experiments.tiny_world.world:write"))
  c.society_lm = sft.get_config("tiny")
  c.sandbox = sandbox.get_config("tiny" if a.tiny else None)
  c.data_prep = ml_collections.ConfigDict(dict(ratio="", validation_percent=5.0, seed=0))
  # The staged recipe (the paper), each later stage replaying the earlier kinds at `replay`
  # (common.REPLAY_SHARE says why it is not 0; `:replay=0` is the paper as written).
  c.stages = ml_collections.ConfigDict(
      {name: _train_cfg(m, a.tiny) for name, m in (("stage1", stage1), ("stage2", stage2),
                                                   ("stage3", stage3))})
  # Baselines train from base_model on the imitation data (paper Table 1); `mixed` is the
  # authors' released recipe (configs/mixed.py), one run on the 5:1:1 mixture of all kinds.
  baselines = {"mixed": mixed, "sft": sft, "dpo": dpo, "rrhf": rrhf, "coh": coh}
  if a.peers:  # `:peers`: also the preference losses peers offer, each a row of the table
    baselines.update(ipo=ipo, simpo=simpo, orpo=orpo, cdpo=cdpo)
  c.baselines = ml_collections.ConfigDict(
      {name: _train_cfg(m, a.tiny) for name, m in baselines.items()})
  # The RLHF baseline (the paper's TRLX row): reward model on the imitation groups, then PPO.
  c.rlhf = ml_collections.ConfigDict(dict(
      enabled=a.ppo, reward=reward.get_config("society" if a.tiny else "sandbox"),
      ppo=ppo.get_config("society" if a.tiny else None)))
  c.eval = eval_config.get_config("tiny" if a.tiny else None)
  c.eval.skip_missing = True  # a benchmark whose files are absent is listed, not fatal

  if a.tiny:
    # A 2-layer, 128-wide LM over a 512-piece SentencePiece vocabulary trained on the world.
    model = common.tiny_world_model()
    lm = c.society_lm
    lm.model = model
    lm.data.source, lm.data.num_responses, lm.data.max_len = "jsonl", 1, 256
    lm.data.batch_size = 16
    lm.optim.lr = 3e-3
    lm.train.steps, lm.train.eval_every, lm.train.log_every = 250, 0, 25
    lm.checkpoint.save_every = 50

    sb = c.sandbox
    sb.world.n_agents, sb.world.grid_size, sb.rounds = 9, 4, 3
    sb.world.priors_per_agent = 4
    sb.backends.local.max_prompt_tokens = 256
    sb.backends.local.min_batch = 32
    for role in ("draft", "feedback", "revise", "observe"):
      sb.sampling[role].max_tokens = 32
    sb.world.setting = "mixed_half_half"

    for stage in list(c.stages.values()) + list(c.baselines.values()):
      stage.model = model
      stage.data.source = "tfds"
      # Every response whole: the self-critic prompt (preamble, question, draft) runs ~230
      # tokens of the world's 512-piece vocabulary and its critiques ~28, so 256 left 8 of 27
      # self-critic examples with no response that fits (measured on this run's export);
      # 288 fits them all, for ~10-25% more step time than 256 on CPU.
      stage.data.max_len = 288
      stage.data.batch_size = 8
      stage.optim.lr = 1e-3
      stage.train.steps, stage.train.eval_every, stage.train.log_every = 30, 0, 5
      stage.checkpoint.save_every = 10
    for name in ("dpo", "rrhf", "coh"):  # one baseline keeps the tiny run short
      del c.baselines[name]

    ev = c.eval
    ev.methods = ml_collections.ConfigDict()
    ev.extra_tasks = ml_collections.ConfigDict({"tiny_world_mc": {
        "items": "experiments.tiny_world.world:mc_items", "column": "Tiny world MC"}})
    ev.tasks = ("tiny_world_mc,moral_stories,truthfulqa_mc1,answer_format,"
                "answer_format_sampled")
    ev.limit = 64
    ev.tokenizer = ""
    # Held-out world questions (no world file holds them, so no stage trained on them).
    ev.answer_format.questions = "experiments.tiny_world.world:heldout_questions"
    ev.answer_format.exclude_file = ""
    ev.answer_format.n = 64
    # A realignment reply (dataset 1.3.0: one reason, the marker, the revision) runs ~60-65
    # tokens here; 128 leaves room for the bulleted form (~110-140).
    ev.answer_format.max_new_tokens = 128
  _recipes(c, a.replay)
  return c


def _recipes(c, replay: float) -> None:
  """Each stage's data mixture (base.tiny leaves a stage one source; the pipeline's stages read
  its TFDS datasets) and the mixed run's 5:1:1 of all kinds."""
  for name, kind in DATASETS.items():
    c.stages[name].data.mixture = common.replay_mixture(kind, replay)
  if "mixed" in c.baselines:
    c.baselines.mixed.data.mixture = mixed.get_config().data.mixture


def _small(spec: str, replay: float) -> ml_collections.ConfigDict:
  """The paper's pipeline shrunk to minutes on a CPU, on the pretrained model `spec`."""
  c = get_config(f"replay={replay}")
  c.out_dir = "runs/pipeline_small"
  c.base_model = spec
  # 18 episodes may hold no revision that beats its draft: then Stage 3 is skipped, and says so.
  c.skip_empty_stages = True
  c.sandbox = sandbox.get_config("tiny")  # 9 agents on a 4x4 grid, 2 rounds, in-process model
  sb = c.sandbox
  sb.run_id = "sandbox_small"
  sb.world.priors_per_agent = 4
  sb.rating_mode = "auto"  # choice: the next-token scores of 1..7 (a small model rarely writes
  local = sb.backends.local  # "Rating: N" exactly)
  local.model, local.min_batch, local.max_prompt_tokens = spec, 1, 384
  sb.agent_models.a.model = sb.observer.model = "base"
  for role, n in (("draft", 48), ("feedback", 32), ("revise", 48), ("observe", 8)):
    sb.sampling[role].max_tokens = n
  for stage in list(c.stages.values()) + list(c.baselines.values()):
    # model.* and data.tokenizer come from the checkpoint (init_from); the run's sizes are ours.
    stage.model.dtype, stage.model.remat = "float32", "none"
    stage.mesh.fsdp = -1
    stage.data.batch_size, stage.data.max_len = 2, 256
    stage.optim.lr, stage.optim.warmup_ratio = 1e-5, 0.0
    stage.train.steps, stage.train.eval_every, stage.train.log_every = 4, 0, 1
    stage.train.tensorboard = False
    stage.checkpoint.save_every = 4
  for name in ("dpo", "rrhf", "coh"):
    del c.baselines[name]
  # PPO on a 135M model needs hundreds of sampled rollouts to move; on 2 CPU cores that is
  # longer than the rest of this run together. `--config.rlhf.enabled=true` runs it anyway.
  c.rlhf.enabled = False
  c.eval.tasks = "moral_stories,truthfulqa_mc1"
  c.eval.limit = 32
  c.eval.mc.batch_size = 16
  return c
