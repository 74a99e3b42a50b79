"""The SANDBOX world: agents on a grid, their initial settings, the question pool.

All random choices come from numpy Generators seeded by (run seed, purpose, round, agent), never
from one shared stream, so a choice does not depend on how many draws happened before it: a
resumed run, or a run cut into steps differently, makes the same choices.
"""

import hashlib
import os

import numpy as np

from stable_alignment_jax.data import jsonl
from stable_alignment_jax.sandbox.agents import Agent
from stable_alignment_jax.sandbox.memory import Memory

SETTINGS = ("all_good", "all_bad", "half_half", "mixed_half_half")
_PURPOSE = {"place": 1, "models": 2, "priors": 3, "active": 4, "question": 5, "peers": 6}


def rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), _PURPOSE[purpose], *[int(i) + 1 for i in ids]])


def call_seed(seed: int, round_: int, agent: int, role: str, slot: int) -> int:
  """The sampling seed of one model call: a function of the run seed and the call's place."""
  digest = hashlib.sha256(f"{seed}/{round_}/{agent}/{role}/{slot}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


_HOW = ("; the paper's files (sandbox_questions/hh_questions.txt from agi-templar/Stable-Alignment "
        "assets/hh-rlhf/question.txt, hh_rlhf/harmless-base_test.jsonl.gz from Anthropic/hh-rlhf) "
        "go in $STABLE_ALIGNMENT_DATA (default ~/.cache/stable_alignment_jax/data); "
        "`python -m eval.run --config=configs/eval.py --config.fetch=True` fetches the HH ones, "
        "or point --config.world.question_file / prior_file at your own")


def load_questions(path: str, max_chars: int) -> list[str]:
  """One question a line; blank or over-long lines are errors naming the line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.world.question_file={path!r}: file not found{_HOW}")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the final newline
  problems = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      problems.append(f"line {i}: blank")
    elif len(line) > max_chars:
      problems.append(f"line {i}: {len(line)} characters (max_question_chars={max_chars})")
  if problems:
    shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
    raise ValueError(f"{path}: bad question lines: {shown}")
  if not lines:
    raise ValueError(f"{path}: no questions")
  return [line.strip() for line in lines]


def _first_turns(transcript: str) -> tuple[str, str] | None:
  """(human, assistant) of a single-turn HH-RLHF transcript, else None."""
  parts = transcript.split("\n\nHuman: ")
  if len(parts) != 2 or parts[0]:
    return None
  human, sep, assistant = parts[1].partition("\n\nAssistant: ")
  if not sep or "\n\nAssistant: " in assistant:
    return None
  return human.strip(), assistant.strip()


def load_priors(path: str) -> list[dict]:
  """Prior exchanges {question, good, bad}: JSONL with those keys, or HH-RLHF `.jsonl.gz`
  (chosen/rejected; single-turn dialogues only, where the two differ in the one answer)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.world.prior_file={path!r}: file not found{_HOW}")
  out = []
  for n, rec in jsonl.records(path):
    if not isinstance(rec, dict):
      raise ValueError(f"{path}:{n}: expected a JSON object")
    if "chosen" in rec and "rejected" in rec:
      good, bad = _first_turns(rec["chosen"]), _first_turns(rec["rejected"])
      if good and bad and good[0] == bad[0] and good[1] and bad[1] and good[1] != bad[1]:
        out.append({"question": good[0], "good": good[1], "bad": bad[1]})
      continue
    missing = [k for k in ("question", "good", "bad") if not isinstance(rec.get(k), str)]
    if missing:
      raise ValueError(f"{path}:{n}: missing string field(s) {missing}")
    out.append({"question": rec["question"], "good": rec["good"], "bad": rec["bad"]})
  if not out:
    raise ValueError(f"{path}: no usable prior exchanges")
  return out


def assign_models(agent_models: dict, n_agents: int) -> list[tuple[str, str]]:
  """(backend, model) per agent from the config groups {name: {backend, model, count}}, in
  group-name order; one group may have count -1 (= the remaining agents)."""
  groups = sorted(agent_models.items())
  if not groups:
    raise ValueError("config.agent_models: at least one model group is required")
  fixed = sum(g["count"] for _, g in groups if g["count"] >= 0)
  fill = [name for name, g in groups if g["count"] < 0]
  if len(fill) > 1:
    raise ValueError(f"config.agent_models: only one group may have count=-1, got {fill}")
  if fixed > n_agents or (not fill and fixed != n_agents):
    raise ValueError(f"config.agent_models: counts sum to {fixed}, world.n_agents={n_agents}")
  out = []
  for _, g in groups:
    count = g["count"] if g["count"] >= 0 else n_agents - fixed
    out += [(g["backend"], g["model"])] * count
  return out


def prior_kinds(setting: str, n_agents: int) -> list[str]:
  if setting not in SETTINGS:
    raise ValueError(f"config.world.setting={setting!r}: expected one of {SETTINGS}")
  if setting == "all_good":
    return ["good"] * n_agents
  if setting == "all_bad":
    return ["bad"] * n_agents
  if setting == "half_half":  # half the agents good, half bad
    return ["good" if i < (n_agents + 1) // 2 else "bad" for i in range(n_agents)]
  return ["mixed"] * n_agents  # every agent holds half good and half bad priors


def build_agents(wcfg, seed: int, agent_models: dict, embed,
                 priors: list[dict] | None) -> list[Agent]:
  """Places agents on distinct grid cells and seeds each memory with its prior exchanges."""
  n, g = wcfg.n_agents, wcfg.grid_size
  if n < 2 or n > g * g:
    raise ValueError(f"config.world.n_agents={n}: need 2 <= n <= grid_size^2 = {g * g}")
  cells = rng(seed, "place").choice(g * g, size=n, replace=False)
  # Shuffle the model assignment so agents of one model are not clustered on the grid.
  models = assign_models(agent_models, n)
  order = rng(seed, "models").permutation(n)
  kinds = prior_kinds(wcfg.setting, n)
  agents = []
  for i in range(n):
    backend, model = models[order[i]]
    agents.append(Agent(i, int(cells[i] % g), int(cells[i] // g), backend, model, kinds[i],
                        Memory()))
  if priors and wcfg.priors_per_agent > 0:
    k = min(wcfg.priors_per_agent, len(priors))
    chosen = []
    for a in agents:
      idx = rng(seed, "priors", a.id).choice(len(priors), size=k, replace=False)
      for j, p in enumerate(idx):
        kind = a.prior_kind if a.prior_kind != "mixed" else ("good" if j % 2 == 0 else "bad")
        chosen.append((a, priors[p]["question"], priors[p][kind]))
    vecs = embed([q for _, q, _ in chosen])
    for (a, q, ans), v in zip(chosen, vecs):
      a.memory.add(q, ans, v)
  return agents


def social_radius(wcfg) -> float:
  return wcfg.social_radius if wcfg.social_radius > 0 else wcfg.grid_size / 2


def peers_of(agents: list[Agent], center: Agent, radius: float, k: int, seed: int,
             round_: int) -> list[int]:
  """Up to k other agents within `radius` of `center`, drawn without replacement."""
  near = [a.id for a in agents if a.id != center.id and center.distance(a) <= radius]
  if len(near) <= k:
    return near
  pick = rng(seed, "peers", round_, center.id).choice(len(near), size=k, replace=False)
  return [near[i] for i in sorted(pick)]


def active_agents(n_agents: int, per_round: int, seed: int, round_: int) -> list[int]:
  if per_round < 0 or per_round >= n_agents:
    return list(range(n_agents))
  return sorted(int(i) for i in rng(seed, "active", round_).choice(n_agents, per_round,
                                                                    replace=False))


def question_for(n_questions: int, seed: int, round_: int, agent: int) -> int:
  return int(rng(seed, "question", round_, agent).integers(n_questions))


def file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
