"""SANDBOX: the simulated society that produces the alignment data (Back-Scatter rounds).

  python -m stable_alignment_jax.sandbox run --config=configs/sandbox.py \
      --config.backends.server.base_url=http://127.0.0.1:8000/v1   # key in $SANDBOX_API_KEY
  python -m stable_alignment_jax.sandbox run --config=configs/sandbox.py:tiny   # CPU, offline
  python -m stable_alignment_jax.sandbox status --store=runs/sandbox/sandbox.sqlite
  python -m stable_alignment_jax.sandbox export --store=... --out=sandbox.jsonl

`arg` (comma separated): `tiny` = 9 agents, 2 rounds, an in-process random tiny model;
`agents=N`, `rounds=N` override the society size and length.

The `:tiny` society on a trained checkpoint (JAX backend `local`; the tokenizer comes from the
run's config, an HF directory's own files, or `backends.local.tokenizer`):
  python -m stable_alignment_jax.sandbox run --config=configs/sandbox.py:tiny \
      --config.backends.local.model=runs/stage3 --config.agent_models.a.model=stage3 \
      --config.observer.model=stage3
"""

import os

import ml_collections

from eval import items
from stable_alignment_jax.contracts import bucket

# The same per-user data directory as eval's benchmark files ($STABLE_ALIGNMENT_DATA, else
# ~/.cache/stable_alignment_jax/data); the question and prior files are the paper's
# (agi-templar/Stable-Alignment assets/hh-rlhf/question.txt, Anthropic HH-RLHF harmless-base).
DATA = items.default_data_dir()


def _parse(arg):
  out = {"tiny": False, "agents": 0, "rounds": 0}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if key not in out:
      raise KeyError(f"configs/sandbox.py: unknown arg {key!r}; known: {sorted(out)}")
    out[key] = int(value) if sep else True
    if sep and key == "tiny":
      raise ValueError("configs/sandbox.py: `tiny` takes no value")
  return out


def _sampling(max_tokens, temperature=0.7):
  return ml_collections.ConfigDict(dict(max_tokens=max_tokens, temperature=temperature, top_p=0.95))


def phase_buckets(n_agents: int, k_peers: int) -> list[int]:
  """Batch sizes of a step's phases, as powers of two (the sampler's): n drafts or revisions,
  2n observer scores (moral and engagement), up to n * k peer ratings."""
  return sorted({bucket(n_agents), bucket(2 * n_agents), bucket(n_agents * k_peers)})


def get_config(arg=None):
  a = _parse(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.run_id = "sandbox"
  c.run_dir = "runs/sandbox"
  c.store = ""  # default: {run_dir}/{run_id}.sqlite

  c.world = ml_collections.ConfigDict()
  c.world.n_agents = 100  # paper: 100 agents
  c.world.grid_size = 10  # paper: a 10x10 grid
  c.world.social_radius = -1.0  # -1 = grid_size / 2 (paper)
  c.world.k_peers = 4  # paper: 4 peers give feedback
  c.world.setting = "mixed_half_half"  # all_good | all_bad | half_half | mixed_half_half
  c.world.priors_per_agent = 50  # paper: 50 prior question -> answer pairs per agent
  # Prior answers: HH-RLHF single-turn dialogues, chosen = good, rejected = bad.
  c.world.prior_file = os.path.join(DATA, "hh_rlhf", "harmless-base_test.jsonl.gz")
  c.world.question_file = os.path.join(DATA, "sandbox_questions", "hh_questions.txt")
  c.world.max_question_chars = 2000

  c.rounds = 10
  c.agents_per_round = -1  # -1 = every agent is a central agent once per round
  c.agents_per_step = -1  # -1 = the whole round is one step (one batch per phase)

  # How peer ratings and observer scores are read (sandbox/judging.py): text = the strict parse
  # of the written format; choice = the next-token scores of "1".."7" after the format's cue
  # (JAX backend: the model's logits; OpenAI-compatible: the server's logprobs, once a probe has
  # verified that it continues the cue, text where it cannot); auto = choice where the backend
  # kind can score, text elsewhere.
  c.rating_mode = "auto"

  c.memory = ml_collections.ConfigDict(dict(threshold=0.5, accept="better"))
  c.embedder = ml_collections.ConfigDict(dict(kind="hashing", dim=256))

  # Model groups {name: backend, model, count}; count -1 = the remaining agents. Several
  # groups reproduce the paper's mixed society (text-davinci-002/003, GPT-4 ...).
  c.agent_models = ml_collections.ConfigDict({
      "a": dict(backend="server", model="agent-model", count=-1)})
  c.observer = ml_collections.ConfigDict(dict(backend="server", model="observer-model"))
  # retry_budget_s: how long the server may keep failing (connection refused, 5xx, 429,
  # timeouts) before the run stops with the `resume` command; retries back off exponentially
  # from backoff_s to backoff_max_s; max_retries >= 0 also caps the count per call (-1: time
  # only). tokenizer: the served model's HF tokenizer (directory or hub id), optional: where the
  # server does not continue a final assistant message, choices are then read through the
  # completions API with the chat rendered by that template (else ratings are read as text).
  c.backends = ml_collections.ConfigDict({
      "server": dict(kind="openai", base_url="http://127.0.0.1:8000/v1", api="chat",
                     api_key_env="SANDBOX_API_KEY", concurrency=16, timeout_s=60.0,
                     retry_budget_s=300.0, max_retries=-1, backoff_s=1.0, backoff_max_s=30.0,
                     top_logprobs=20, tokenizer=""),
  })
  c.sampling = ml_collections.ConfigDict({
      "draft": _sampling(256), "feedback": _sampling(96), "revise": _sampling(256),
      "observe": _sampling(16, temperature=0.0),
  })
  c.prompts = ml_collections.ConfigDict()  # overrides of sandbox/prompts.py DEFAULTS by name

  if a["tiny"]:
    c.run_id = "sandbox_tiny"
    c.world.n_agents, c.world.grid_size, c.world.priors_per_agent = 9, 4, 4
    c.rounds = 2
    c.backends = ml_collections.ConfigDict({
        # `model`: any checkpoint spec (random:tiny[:seed], an HF LLaMA dir, a training run
        # dir); batch_buckets (set below from the society's size): each phase pads to the
        # smallest bucket that holds it (9 agents: 16, 32 or 64 rows), one compile per bucket.
        # chat_template: auto = the model's own template when its tokenizer has one, else raw.
        "local": dict(kind="jax", model="random:tiny:0", tokenizer="", dtype="float32",
                      max_prompt_tokens=192, devices=1, min_batch=1, batch_buckets=[],
                      chat_template="auto"),
    })
    c.agent_models = ml_collections.ConfigDict({
        "a": dict(backend="local", model="tiny-random", count=-1)})
    c.observer = ml_collections.ConfigDict(dict(backend="local", model="tiny-random"))
    for role in ("draft", "feedback", "revise", "observe"):
      c.sampling[role].max_tokens = 24
  if a["agents"]:
    c.world.n_agents = a["agents"]
  if a["rounds"]:
    c.rounds = a["rounds"]
  if a["tiny"]:  # after `agents=`: a command-line override of the size should reset it too
    per_step = c.agents_per_step if c.agents_per_step > 0 else c.world.n_agents
    c.backends.local.batch_buckets = phase_buckets(per_step, c.world.k_peers)
  return c
