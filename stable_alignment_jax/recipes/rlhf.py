"""The RLHF baseline as one call: a reward model, then PPO against it, from one start checkpoint.

`run_baseline` trains the Bradley–Terry reward model (reward.py) on a SANDBOX imitation data set
(every differently rated pair of a prompt's answers), then PPO (ppo.py) of the same starting
checkpoint against it on the same data set's prompts: the paper's TRLX row. Prompts are laid out
as the stages train (data.prompt_format "auto": Alpaca for a plain tokenizer, the chat template
for a chat checkpoint), so the policy samples in the layout it is evaluated in.

Each part resumes on its own (both checkpoint); a finished part leaves `rlhf_summary.json` in
its directory and is skipped when called again. PPO's run directory holds {policy, value_head}
and its optimizer state; the trained policy is exported as a plain run directory
`{ppo_dir}/policy` (checkpoints.save_model), which load_model, TextSampler.load and eval read
like any stage's run directory, and which the summary returns as "dir".
"""

import json
import os
import shutil
from typing import Any

import ml_collections

from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.training import ppo, reward
from stable_alignment_jax.model.presets import ModelConfig

SUMMARY = "rlhf_summary.json"
POLICY = "policy"


def _configured(cfg, *, source, data_dir, dataset, tokenizer, start, out_dir, seed):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.data.source, c.data.data_dir, c.data.dataset = source, data_dir, dataset
  if tokenizer:
    c.data.tokenizer = tokenizer
  c.checkpoint.dir = os.path.abspath(os.path.expanduser(out_dir))
  c.checkpoint.init_from = start
  c.seed = seed
  return c


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(path: str, obj: dict) -> dict:
  """Writes the summary; returns it as read back, so a first call and a skipping one agree."""
  obj = json.loads(json.dumps(obj, default=float))  # numpy scalars of the metrics -> floats
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)  # a kill leaves no half-written summary that would skip the part
  return obj


def _log_records(run_dir: str) -> list[dict]:
  """metrics.jsonl of a run, the last record per step (a resumed run logs redone steps twice)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      by_step[(rec.get("split", "train"), rec.get("step"))] = rec
  return list(by_step.values())


def train_reward(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """reward.run once: a finished run's summary is read back, not retrained."""
  done = _read(os.path.join(c.checkpoint.dir, SUMMARY))
  if done:
    return done
  s = reward.run(c)
  final = s["final"]
  if not final:  # resumed after its last step: the loop logged nothing this time
    train = [r for r in _log_records(s["dir"]) if r.get("split") == "train"]
    final = max(train, key=lambda r: r["step"]) if train else {}
  out = {"dir": s["dir"], "origin": s["origin"], "steps": s["steps"], "final": final,
         "eval": s["eval"], "data": s["data"]}
  return _write(os.path.join(s["dir"], SUMMARY), out)


def export_policy(ppo_dir: str, policy, *, source: str) -> str:
  """PPO's policy as a plain run directory `{ppo_dir}/policy` (model and tokenizer of the PPO
  run's own record). Written beside, then renamed: a kill leaves no directory that looks done."""
  run = checkpoints.read_run_config(ppo_dir)
  cfg = ModelConfig.from_dict(run["model"])
  out = os.path.join(ppo_dir, POLICY)
  partial = out + ".partial"
  for d in (partial, out):  # leftovers of a killed export (no summary was written after them)
    if os.path.exists(d):
      shutil.rmtree(d)
  checkpoints.save_model(cfg, policy, partial,
                         tokenizer=run["data"]["tokenizer"], source=source)
  os.replace(partial, out)
  return out


def train_policy(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """ppo.run once, then the policy's export; a finished run's summary is read back."""
  done = _read(os.path.join(c.checkpoint.dir, SUMMARY))
  if done:
    return done
  s = ppo.run(c)
  steps = c.train.steps
  # ppo.run's plain policy state (under LoRA the adapters merged into the base).
  policy = export_policy(s["dir"], s["policy"],
                         source=f"ppo {s['dir']} iteration {steps} (init {c.checkpoint.init_from})")
  # The whole run's iterations, also those of a run killed and resumed (metrics.jsonl).
  history = sorted((r for r in _log_records(s["dir"]) if r.get("split") == "train"),
                   key=lambda r: r["step"])
  keys = ("step", "score", "kl", "kl_coef", "reward", "response_len", "loss")
  out = {"dir": policy, "run_dir": s["dir"], "origin": s["origin"], "steps": steps,
         "final": history[-1] if history else {},
         "history": [{k: r[k] for k in keys if k in r} for r in history]}
  return _write(os.path.join(s["dir"], SUMMARY), out)


def run_baseline(reward_cfg: ml_collections.ConfigDict, ppo_cfg: ml_collections.ConfigDict, *,
                 data_dir: str, dataset: str, tokenizer: str, start: str, reward_dir: str,
                 ppo_dir: str, seed: int, source: str = "tfds") -> dict[str, Any]:
  """Reward model then PPO, both from `start` (a run directory, HF directory or hub id: the
  checkpoint the policy starts from, also PPO's reference). `dataset`/`data_dir`/`source` name
  the imitation data as config.data does (tfds: a TFDS name under data_dir; jsonl:
  {data_dir}/{split}.jsonl); `tokenizer` "" keeps the configs' (or the start's, filled from it).

  Returns (JSON-able) {"dir": the policy's run directory, "reward": {dir, steps, eval (held-out
  pairwise accuracy, loss, margin, pairs), final}, "ppo": {run_dir, steps, final (score, kl, ...),
  history}}. Calling it again continues a killed part and skips finished ones.
  """
  common = dict(source=source, data_dir=data_dir, dataset=dataset, tokenizer=tokenizer,
                start=start, seed=seed)
  rc = _configured(reward_cfg, out_dir=reward_dir, **common)
  rm = train_reward(rc)
  pc = _configured(ppo_cfg, out_dir=ppo_dir, **common)
  pc.reward.model = rm["dir"]
  policy = train_policy(pc)
  return {"dir": policy["dir"], "reward": rm, "ppo": policy}
