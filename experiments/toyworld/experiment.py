"""The toy-society experiment as pipeline steps (`experiments/toyworld/config.py` names this class).

Order: world -> society_lm -> one SANDBOX per initial setting -> rater accuracy -> data (the
settings' exports pooled) -> per seed: IL (stage1), IL+SC (stage2), IL+SC+RA (stage3), SFT (on
the initial good answers), DPO, RRHF -> oracle eval per system -> report. Every step is in the
pipeline's ledger, so a killed run resumes; the report is rewritten on every run from whatever
has finished, and says which systems are missing.
"""

import json
import os

import numpy as np

from stable_alignment_jax import pipeline
from experiments.toyworld import grammar, report, world

METHODS = {"stage1": "IL", "stage2": "IL+SC", "stage3": "IL+SC+RA", "sft": "SFT",
           "dpo": "DPO", "rrhf": "RRHF"}


def rater_accuracy(records: list[dict]) -> dict:
  """The society's ratings vs the oracle, over every rated answer of the exports.

  `peer_*`: the peers' 1-7 ratings of drafts; `observer_*`: the observer's Moral score of drafts
  and revisions. accuracy = the rating's side of 4 agrees with the oracle's sign (answers the
  oracle calls evasive, alignment 0, and ratings of exactly 4 are left out); `corr` = Pearson
  correlation with the oracle alignment; `unparsed` = share of null ratings."""
  peer, observer = [], []
  for rec in records:
    d = grammar.oracle(rec["draft"]["text"]).alignment
    peer += [(f["rating"], d) for f in rec["feedback"]]
    observer.append((rec["draft"]["moral"], d))
    observer.append((rec["revised"]["moral"], grammar.oracle(rec["revised"]["text"]).alignment))
  return {"peer": _agreement(peer), "observer": _agreement(observer)}


def _agreement(pairs) -> dict:
  valid = [(r, o) for r, o in pairs if r is not None]
  signed = [(r, o) for r, o in valid if r != 4 and o != 0]
  acc = float(np.mean([(r > 4) == (o > 0) for r, o in signed])) if signed else float("nan")
  corr = float("nan")
  if len(valid) > 2:
    r, o = np.array(valid, float).T
    if r.std() > 0 and o.std() > 0:
      corr = float(np.corrcoef(r, o)[0, 1])
  return {"accuracy": acc, "corr": corr, "n": len(pairs), "n_signed": len(signed),
          "unparsed": 1 - len(valid) / len(pairs) if pairs else float("nan")}


def oracle_rounds(records: list[dict]) -> list[dict]:
  """Oracle alignment of drafts and revisions per round (the society's true trajectory)."""
  by = {}
  for rec in records:
    by.setdefault(rec["round"], []).append(rec)
  return [{"round": r, "draft": float(np.mean([grammar.oracle(x["draft"]["text"]).alignment
                                               for x in by[r]])),
           "revised": float(np.mean([grammar.oracle(x["revised"]["text"]).alignment
                                     for x in by[r]])), "episodes": len(by[r])}
          for r in sorted(by)]


def oracle_export(records: list[dict]) -> list[dict]:
  """The ablation's data: the same episodes, every rating replaced by the noiseless oracle's
  (peer rating = round(4 + 2.5 * alignment), observer Moral = 4 + 3 * alignment)."""
  out = []
  for rec in records:
    rec = json.loads(json.dumps(rec))
    a = grammar.oracle(rec["draft"]["text"]).alignment
    for f in rec["feedback"]:
      f["rating"] = int(np.clip(round(4 + 2.5 * a), 1, 7))
    for k in ("draft", "revised"):
      rec[k]["moral"] = grammar.oracle(rec[k]["text"]).moral
    out.append(rec)
  return out


def read_export(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class ToyPipeline(pipeline.Pipeline):

  def make_world(self) -> dict:
    from data_prep import tokenizer as tok_lib
    paths = world.write(self.path("world"), self.c.world, seed=self.c.seed,
                        prompt_overrides=self.c.sandbox.prompts.to_dict())
    paths["tokenizer"] = tok_lib.train([paths["tokenizer_text"]], self.path("world", "sp"),
                                       vocab_size=self.c.world.vocab_size, seed=self.c.seed)
    items = world.eval_items(self.c.world.eval_items)
    paths["eval_items"] = self.path("world", "eval_items.json")
    with open(paths["eval_items"], "w") as f:
      json.dump(items, f)
    return paths

  def society(self, world_paths: dict, setting: str) -> dict:
    out = self.sandbox(world_paths, name=f"sandbox_{setting}", setting=setting)
    out["oracle_rounds"] = oracle_rounds(read_export(out["export"]))
    return out

  def evaluate_one(self, spec: str, world_paths: dict) -> dict:
    from experiments.toyworld import evaluate
    with open(world_paths["eval_items"]) as f:
      items = json.load(f)
    return evaluate.evaluate(spec, world_paths["tokenizer"], items, **self.c.toy_eval)

  def train_method(self, name: str, seed: int, card: dict, w: dict, start: str, prev: str):
    kind = pipeline.KINDS.get(name, "imitation")
    cfg = self.c.stages[name] if name in pipeline.KINDS else self.c.baselines[name]
    init = prev if name in ("stage2", "stage3") else start
    run = f"{name}_s{seed}"
    if name == "sft":  # the initial good answers, not the society's data
      s = pipeline.copy_config(cfg)
      s.data.data_dir, s.data.tokenizer = w["sft"], w["tokenizer"]
      s.checkpoint.dir, s.checkpoint.init_from = self.path(run), init
    else:
      s = self._stage_cfg(cfg, kind, card, init, run, w["tokenizer"])
    s.seed = seed
    return self.steps.run(run, lambda: pipeline.train_stage(s))["dir"]

  def run(self) -> dict:
    c = self.c
    w = self.steps.run("world", self.make_world)
    lm = self.steps.run("society_lm", lambda: self.society_lm(w))
    societies = {}
    for setting in c.settings:
      societies[setting] = self.steps.run(f"sandbox_{setting}",
                                          lambda s=setting: self.society(w, s))
    exports = [societies[s]["export"] for s in c.train_setting_data]
    self.steps.run("rater", lambda: rater_accuracy(
        [r for e in exports for r in read_export(e)]))
    card = self.steps.run("data", lambda: self.data(exports))
    systems = {"start": lm["dir"]}
    self.steps.run("eval_start", lambda: self.evaluate_one(lm["dir"], w))
    for seed in c.seeds:  # seed-major: a partial run has whole seeds
      prev = lm["dir"]
      for name in METHODS:
        d = self.train_method(name, seed, card, w, lm["dir"], prev)
        if name in pipeline.KINDS:
          prev = d
        systems[f"{name}_s{seed}"] = d
        self.steps.run(f"eval_{name}_s{seed}", lambda d=d: self.evaluate_one(d, w))
    ablations = {"replay": lambda: self.replay_ablation(exports, w),
                 "oracle_ratings": lambda: self.oracle_ratings_ablation(exports, w, lm["dir"]),
                 "replay_long": lambda: self.replay_long_ablation(w)}
    for ab in c.ablations:
      if ab not in ablations:
        raise ValueError(f"config.ablations: unknown {ab!r}; known: {sorted(ablations)}")
      ablations[ab]()
    return self.write_report()

  def replay_ablation(self, exports: list[str], w: dict) -> None:
    """Stages 2 and 3 with the imitation data mixed into their data (from the same IL run):
    tests whether each stage overwriting the answer format of the one before explains the
    later stages' failure."""
    def build():
      from data_prep import alignment_examples as ae
      examples, _ = ae.build_examples([r for e in exports for r in read_export(e)])
      out = {}
      for name, kind in (("stage2", "self_critic"), ("stage3", "realignment")):
        mixed = examples["imitation"] + examples[kind]
        d = self.path("data_replay", name)
        os.makedirs(d, exist_ok=True)
        for split, rows in (("train", mixed), ("validation", mixed[:4])):
          with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        out[name] = {"dir": d, "examples": len(mixed), "imitation": len(examples["imitation"])}
      return out
    mixes = self.steps.run("data_replay", build)
    for seed in self.c.seeds:
      prev = self.path(f"stage1_s{seed}")
      for name in ("stage2", "stage3"):
        run = f"{name}_replay_s{seed}"
        s = pipeline.copy_config(self.c.stages[name])
        s.data.source, s.data.data_dir, s.data.tokenizer = "jsonl", mixes[name]["dir"], w["tokenizer"]
        s.checkpoint.dir, s.checkpoint.init_from, s.seed = self.path(run), prev, seed
        prev = self.steps.run(run, lambda s=s: pipeline.train_stage(s))["dir"]
        self.steps.run(f"eval_{run}", lambda d=prev: self.evaluate_one(d, w))

  def replay_long_ablation(self, w: dict) -> None:
    """Stage 3 of the replay ablation trained `long_steps` instead of `steps`: does the
    realignment format (feedback, marker, revision) need more training to reach the revision?"""
    for seed in self.c.seeds:
      run = f"stage3_replay_long_s{seed}"
      s = pipeline.copy_config(self.c.stages.stage3)
      s.data.source, s.data.tokenizer = "jsonl", w["tokenizer"]
      s.data.data_dir = self.path("data_replay", "stage3")
      s.train.steps = s.checkpoint.save_every = self.c.long_steps
      s.checkpoint.dir, s.seed = self.path(run), seed
      s.checkpoint.init_from = self.path(f"stage2_replay_s{seed}")
      d = self.steps.run(run, lambda s=s: pipeline.train_stage(s))["dir"]
      self.steps.run(f"eval_{run}", lambda d=d: self.evaluate_one(d, w))

  def oracle_ratings_ablation(self, exports: list[str], w: dict, start: str) -> None:
    """IL -> IL+SC -> IL+SC+RA on the same episodes with the rater noise removed."""
    def build():
      from data_prep import build as build_lib
      path = self.path("sandbox_oracle_ratings.jsonl")
      with open(path, "w") as f:
        for e in exports:
          f.writelines(json.dumps(r) + "\n" for r in oracle_export(read_export(e)))
      dp = self.c.data_prep
      return build_lib.build([path], self.path("data_oracle"), ratio=dp.ratio or None,
                             seed=dp.seed, validation_percent=dp.validation_percent)
    card = self.steps.run("data_oracle", build)
    for seed in self.c.seeds:
      prev = start
      for name, kind in pipeline.KINDS.items():
        run = f"{name}_oracle_s{seed}"
        s = self._stage_cfg(self.c.stages[name], kind, card, prev, run, w["tokenizer"])
        s.data.data_dir, s.seed = self.path("data_oracle"), seed
        prev = self.steps.run(run, lambda s=s: pipeline.train_stage(s))["dir"]
        self.steps.run(f"eval_{run}", lambda d=prev: self.evaluate_one(d, w))

  def write_report(self) -> dict:
    out = report.write(self.steps.done, self.c, self.path("report"))
    docs = os.path.abspath(self.c.docs_dir)
    report.copy_to(self.path("report"), docs)
    print(out["markdown"], flush=True)
    return {"table": os.path.join(docs, "results.md"), "seconds":
            {k: v["seconds"] for k, v in self.steps.done.items()}}
