"""The toy-society experiment as pipeline steps (`experiments/toyworld/config.py` names this class).

Order: world -> society_lm -> per seed: one SANDBOX per initial setting run with that seed ->
rater accuracy -> data (the settings' exports pooled) -> SFT (on the initial good answers), DPO
(on the imitation groups' rated pairs), IL (stage1), IL step-matched (IL continued for stage 2's
and stage 3's steps, each segment restarting warmup and AdamW as the stages do, so it has
IL+SC+RA's steps and lr schedule), IL+SC and IL+SC+RA without replay (the paper as written) and
with replay (the default recipe), mixed (the authors' 5:1:1 run), PPO (reward model on the
society's ratings) -> oracle eval per system -> report. Seed-major, so a partial run has whole seeds. Every step is in the
pipeline's ledger, so a killed run resumes; the report is rewritten on every run from whatever
has finished, and says which systems are missing.
"""

import json
import os

import numpy as np

from stable_alignment_jax.recipes import pipeline
from experiments.toyworld import grammar, report, world

METHODS = report.METHODS


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

  def society(self, world_paths: dict, setting: str, seed: int) -> dict:
    # The society itself is rerun per seed.
    out = self.sandbox(world_paths, name=f"sandbox_{setting}_s{seed}", setting=setting, seed=seed)
    out["oracle_rounds"] = oracle_rounds(read_export(out["export"]))
    return out

  def evaluate_one(self, spec: str, world_paths: dict) -> dict:
    from experiments.toyworld import evaluate
    with open(world_paths["eval_items"]) as f:
      items = json.load(f)
    return evaluate.evaluate(spec, world_paths["tokenizer"], items, **self.c.toy_eval)

  def train_one(self, name: str, seed: int, card: dict, w: dict, init: str,
                steps: int | None = None) -> str:
    """One method's training run of seed `seed` from `init`, on that seed's data; `steps`
    overrides the config's."""
    base = "stage1" if name.startswith("il_matched") else name.replace("_noreplay", "")
    run, data = f"{name}_s{seed}", f"data_s{seed}"
    cfg = self.c.stages[base] if base in pipeline.KINDS else self.c.baselines[base]
    if name == "sft":  # the initial good answers, not the society's data
      s = pipeline.copy_config(cfg)
      s.data.data_dir, s.data.tokenizer = w["sft"], w["tokenizer"]
      s.checkpoint.dir, s.checkpoint.init_from = self.path(run), init
    else:
      cfg = pipeline.copy_config(cfg)
      if name.endswith("_noreplay"):
        from configs import common
        cfg.data.mixture = common.replay_mixture(pipeline.KINDS[base], 0.0)
      kind = pipeline.KINDS.get(base, "imitation")
      s = self._stage_cfg(cfg, kind, card, init, run, w["tokenizer"], data=data)
    s.seed = seed
    if steps is not None:
      s.train.steps = steps
    return self.steps.run(run, lambda: pipeline.train_stage(s))["dir"]

  def train_il_matched(self, seed: int, card: dict, w: dict, il_dir: str) -> str:
    """IL continued from the IL run for as many more steps as stages 2 and 3 train, one segment
    per stage with that stage's step count: each segment restarts warmup and AdamW exactly as
    the staged recipe does, so the total steps and the lr schedule equal IL+SC+RA's."""
    later = [k for k in pipeline.KINDS if k != "stage1"]
    d = il_dir
    for i, stage in enumerate(later):
      name = "il_matched" if i == len(later) - 1 else f"il_matched_{stage}"
      d = self.train_one(name, seed, card, w, d, steps=self.c.stages[stage].train.steps)
    return d

  def run(self) -> dict:
    c = self.c
    w = self.steps.run("world", self.make_world)
    lm = self.steps.run("society_lm", lambda: self.society_lm(w))
    start = lm["dir"]
    self.steps.run("eval_start", lambda: self.evaluate_one(start, w))
    for seed in c.seeds:  # seed-major: a partial run has whole seeds
      societies = {}
      for setting in c.settings:
        societies[setting] = self.steps.run(
            f"sandbox_{setting}_s{seed}", lambda st=setting: self.society(w, st, seed))
      exports = [societies[st]["export"] for st in c.train_setting_data]
      self.steps.run(f"rater_s{seed}", lambda: rater_accuracy(
          [r for e in exports for r in read_export(e)]))
      card = self.steps.run(f"data_s{seed}", lambda: self.data(exports, out=f"data_s{seed}"))
      inits = {"stage2": "stage1", "stage3": "stage2", "stage2_noreplay": "stage1",
               "stage3_noreplay": "stage2_noreplay"}
      dirs = {}
      for name in METHODS:
        run = f"{name}_s{seed}"
        if name == "il_matched":
          d = self.train_il_matched(seed, card, w, dirs["stage1"])
        elif name == "ppo":
          d = self.steps.run(run, lambda: self.rlhf(card, start, w["tokenizer"],
                                                     data=f"data_s{seed}", name=run,
                                                     seed=seed))["dir"]
        else:
          init = dirs[inits[name]] if name in inits else start
          d = self.train_one(name, seed, card, w, init)
        dirs[name] = d
        self.steps.run(f"eval_{run}", lambda d=d: self.evaluate_one(d, w))
    return self.write_report()

  def write_report(self) -> dict:
    out = report.write(self.steps.done, self.c, self.path("report"))
    docs = os.path.abspath(self.c.docs_dir)
    report.copy_to(self.path("report"), docs)
    print(out["markdown"], flush=True)
    return {"table": os.path.join(docs, "results.md"), "seconds":
            {k: v["seconds"] for k, v in self.steps.done.items()}}
