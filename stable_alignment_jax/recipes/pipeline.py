"""Simulation to table in one command: world -> society LM -> SANDBOX -> data_prep -> Stage 1/2/3
and baselines -> eval -> report (markdown + JSON table, PNG plots).

  python -m stable_alignment_jax.recipes.pipeline --config=configs/pipeline.py:tiny

The pipeline wires the parts; it re-implements none of them. Every step records itself in
`{out_dir}/pipeline_state.json` when it finishes, so a re-run skips finished steps, and the
parts resume on their own inside a step (training from its latest checkpoint, SANDBOX from its
store, eval from its finished tasks): a killed run continues where it stopped.
"""

import json
import os
import sys
import time

import ml_collections
from absl import app, logging
from ml_collections import config_flags

from stable_alignment_jax import contracts

STATE = "pipeline_state.json"
KINDS = contracts.STAGE_KINDS


class Steps:
  """The finished-step ledger: name -> {seconds, result}; written atomically after each step."""

  def __init__(self, out_dir: str):
    self.path = os.path.join(out_dir, STATE)
    self.done = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.done = json.load(f)["steps"]

  def run(self, name: str, fn):
    if name in self.done:
      print(f"[pipeline] {name}: done earlier ({self.done[name]['seconds']:.0f}s), skipped",
            flush=True)
      return self.done[name]["result"]
    print(f"[pipeline] {name}: starting", flush=True)
    t0 = time.time()
    result = fn()
    self.done[name] = {"seconds": round(time.time() - t0, 1), "result": result}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"steps": self.done}, f, indent=2, default=str)
    os.replace(tmp, self.path)
    print(f"[pipeline] {name}: finished in {self.done[name]['seconds']:.0f}s", flush=True)
    return result


def copy_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A deep copy a step may edit without touching the pipeline's config."""
  return ml_collections.ConfigDict(cfg.to_dict())


def train_stage(cfg) -> dict:
  """One training run, summarised to what the step ledger records (JSON-able)."""
  from stable_alignment_jax.training import train
  summary = train.run(cfg)
  return {"dir": summary["dir"], "origin": summary["origin"], "steps": summary["steps"],
          "final": summary["final"], "data": summary["data"]}


class Pipeline:
  def __init__(self, c: ml_collections.ConfigDict):
    self.c = c
    self.out = os.path.abspath(os.path.expanduser(c.out_dir))
    os.makedirs(self.out, exist_ok=True)
    self.steps = Steps(self.out)
    self.world = self.c.world.enabled
    self.path = lambda *p: os.path.join(self.out, *p)

  # --- the steps ------------------------------------------------------------------------------

  def make_world(self) -> dict:
    from data_prep import tokenizer as tok_lib
    from stable_alignment_jax import plugins
    w = self.c.world
    write = plugins.load(w.write, "world.write")
    paths = write(self.path("world"), n_questions=w.n_questions, n_priors=w.n_priors,
                             n_corpus_topics=w.corpus_topics, seed=self.c.seed,
                             prompt_overrides=self.c.sandbox.prompts.to_dict())
    paths["tokenizer"] = tok_lib.train([paths["tokenizer_text"]], self.path("world", "sp"),
                                       vocab_size=w.vocab_size, seed=self.c.seed)
    return paths

  def society_lm(self, world: dict) -> dict:
    lm = copy_config(self.c.society_lm)
    lm.data.data_dir, lm.data.tokenizer = world["corpus"], world["tokenizer"]
    lm.checkpoint.dir, lm.checkpoint.init_from = self.path("society_lm"), ""
    return train_stage(lm)

  def sandbox(self, world: dict | None, name: str = "sandbox", setting: str = "",
              seed: int | None = None) -> dict:
    """One society under `{out}/{name}`; `setting` overrides `sandbox.world.setting`, `seed`
    `sandbox.seed` (agents, priors, pairings, sampling)."""
    from stable_alignment_jax.sandbox import metrics, plot, runner
    from stable_alignment_jax.sandbox.store import Store
    sb = copy_config(self.c.sandbox)
    sb.run_dir, sb.store = self.path(name), ""
    if seed is not None:
      sb.seed = seed
    if setting:
      sb.world.setting = setting
    if world:
      sb.world.question_file, sb.world.prior_file = world["questions"], world["priors"]
      for backend in sb.backends.values():
        if backend.kind == "jax":
          backend.model = self.path("society_lm")
    export = self.path(name, "export.jsonl")
    n = runner.run_and_export(sb, export, progress=True)
    store = Store(runner.store_path(sb))
    try:
      rows = metrics.per_round(store.episodes(), store.step_rows())
    finally:
      store.close()
    os.makedirs(self.path("report"), exist_ok=True)
    plot.plot_rounds(rows, self.path("report", f"{name}_rounds.png"),
                     title=f"SANDBOX {sb.world.setting}" if setting else "SANDBOX")
    return {"export": export, "episodes": n, "rounds": rows}

  def data(self, export: str | list[str], out: str = "data") -> dict:
    from data_prep import build
    dp = self.c.data_prep
    exports = [export] if isinstance(export, str) else list(export)  # several societies pool
    card = build.build(exports, self.path(out), ratio=dp.ratio or None, seed=dp.seed,
                       validation_percent=dp.validation_percent)
    print(build.summary(card), flush=True)
    return card

  def _stage_cfg(self, cfg, kind: str, card: dict, init_from: str, name: str, tokenizer,
                 data: str = "data"):
    """A training config of the run reading the pipeline's datasets: `kind` is its own data
    (unless the config names a TRL-format one, `data.source = "trl"`);
    a `data.mixture` entry whose kind the export left empty is dropped, and said so."""
    s = copy_config(cfg)
    if s.data.source != "trl":  # a run told to read a TRL-format dataset keeps it
      s.data.source, s.data.dataset = "tfds", f"sandbox_alignment/{kind}"
    s.data.data_dir = self.path(data)
    if tokenizer:
      s.data.tokenizer = tokenizer
    splits = card["datasets"][kind]["splits"]
    if not splits.get(s.data.train_split, {}).get("examples"):
      raise ValueError(f"{name}: the SANDBOX export gave no {kind} training examples "
                       f"(data card: {self.path(data)}); run more rounds or agents")
    for entry in list(s.data.get("mixture") or {}):
      k = s.data.mixture[entry].get("kind", entry)
      if k in card["datasets"] and not _train_examples(card, k):
        print(f"[pipeline] {name}: mixture entry {entry} left out, the export gave no {k} "
              "training examples", flush=True)
        del s.data.mixture[entry]
    if not splits.get(s.data.eval_split, {}).get("examples"):
      logging.warning("%s: no %s validation examples; periodic eval off", name, kind)
      s.train.eval_every = 0
    s.checkpoint.dir, s.checkpoint.init_from = self.path(name), init_from
    return s

  def rlhf(self, card: dict, start: str, tokenizer: str, *, data: str = "data",
           name: str = "ppo", seed: int | None = None) -> dict:
    """The RLHF baseline (the paper's TRLX row): a reward model on the imitation groups' rated
    pairs of `{out}/{data}`, then PPO from `start` against it; `dir` is the exported policy."""
    from stable_alignment_jax.recipes import rlhf
    if not _train_examples(card, "imitation"):
      raise ValueError(f"{name}: the SANDBOX export gave no imitation examples (data card: "
                       f"{self.path(data)})")
    return rlhf.run_baseline(
        self.c.rlhf.reward, self.c.rlhf.ppo, data_dir=self.path(data),
        dataset="sandbox_alignment/imitation", tokenizer=tokenizer, start=start,
        reward_dir=self.path(f"{name}_reward"), ppo_dir=self.path(name),
        seed=self.c.seed if seed is None else seed)

  def evaluate(self, systems: dict[str, str]) -> dict:
    from eval import run as eval_run
    ev = copy_config(self.c.eval)
    ev.out_dir = self.path("eval")
    ev.judge.cache = self.path("eval", "judge_cache.sqlite")
    ev.methods = ml_collections.ConfigDict(systems)
    summary = eval_run.evaluate(ev)
    return {name: s.get("tasks", s) for name, s in summary.items()}

  def report(self, systems: dict[str, str]) -> dict:
    from eval import table
    from stable_alignment_jax.training import train_log
    md = table.make_table([f"{n}={self.path('eval', n)}" for n in systems],  # pipeline order
                          self.path("report"))
    train_log.plot_training_loss(systems, self.path("report", "training_loss.png"))
    print(md, flush=True)
    return {"table": self.path("report", "results.md"), "dir": self.path("report")}

  def preflight(self) -> None:
    """Settings that would otherwise fail hours in are checked before the first step."""
    if not self.world and not self.c.base_model:
      raise ValueError("config.base_model is required without the tiny world: the checkpoint "
                       "Stage 1 and the baselines start from (paper: LLaMA-7B after HH SFT)")
    from eval import judge as judge_lib, run as eval_run
    tasks = eval_run.expand_tasks(self.c.eval.tasks, tuple(self.c.eval.ethics_splits),
                                  tuple(self.c.eval.get("extra_tasks") or ()))
    if any(t in eval_run.GEN_TASKS for t in tasks):
      judge = copy_config(self.c.eval.judge)
      judge.cache = ""
      judge_lib.Judge(judge)  # raises naming the missing endpoint, model or key variable

  # --- the order ------------------------------------------------------------------------------

  def run(self) -> dict:
    t0 = time.time()
    self.preflight()
    world = lm = None
    if self.world:
      world = self.steps.run("world", self.make_world)
      lm = self.steps.run("society_lm", lambda: self.society_lm(world))
    sb = self.steps.run("sandbox", lambda: self.sandbox(world))
    card = self.steps.run("data", lambda: self.data(sb["export"]))
    tokenizer = world["tokenizer"] if world else ""
    start = lm["dir"] if lm else self.c.base_model
    systems = {"start": start} if start else {}
    prev = start
    for name, kind in KINDS.items():  # each stage starts from the previous stage's params
      if self.c.get("skip_empty_stages", False) and not _train_examples(card, kind):
        # A small society can give no example of a kind (e.g. no revision scored above its
        # draft): the stage is left out of the table, the next one starts from `prev`.
        print(f"[pipeline] {name}: skipped, the SANDBOX export gave no {kind} training "
              f"examples (data card: {self.path('data')})", flush=True)
        continue
      cfg = self._stage_cfg(self.c.stages[name], kind, card, prev, name, tokenizer)
      result = self.steps.run(name, lambda cfg=cfg: train_stage(cfg))
      print(f"[pipeline] {name} params loaded from: {result['origin']}", flush=True)
      systems[name] = prev = result["dir"]
    # Baselines start from base_model on the imitation data (paper Table 1); `mixed` (the
    # authors' release) reads its mixture of all three kinds from the same start.
    for name, cfg in self.c.baselines.items():
      cfg = self._stage_cfg(cfg, "imitation", card, start, name, tokenizer)
      systems[name] = self.steps.run(name, lambda cfg=cfg: train_stage(cfg))["dir"]
    if self.c.get("rlhf") and self.c.rlhf.enabled:
      systems["ppo"] = self.steps.run("ppo", lambda: self.rlhf(card, start, tokenizer))["dir"]
    self.steps.run("eval", lambda: self.evaluate(systems))
    report = self.steps.run("report", lambda: self.report(systems))
    times = {k: v["seconds"] for k, v in self.steps.done.items()}
    print(f"[pipeline] done in {time.time() - t0:.0f}s this run; step seconds {times}; "
          f"table {report['table']}", flush=True)
    return {"systems": systems, "report": report, "seconds": times}


def _train_examples(card: dict, kind: str) -> int:
  return card["datasets"][kind]["splits"].get("train", {}).get("examples", 0)


def make_pipeline(c: ml_collections.ConfigDict) -> Pipeline:
  """`Pipeline`, or the subclass a config names in `pipeline_class` ("module:Class"), so a world
  that adds steps (e.g. `experiments/toyworld/config.py`) runs from the same command."""
  spec = c.get("pipeline_class", "")
  if not spec:
    return Pipeline(c)
  from stable_alignment_jax import plugins
  return plugins.load(spec, "pipeline_class")(c)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pipeline.py:tiny")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from stable_alignment_jax import runtime
  runtime.enable_compilation_cache()
  make_pipeline(_CONFIG.value).run()
  sys.stdout.flush()


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pipeline.py[:tiny]",
                                            lock_config=True)
  app.run(main)


if __name__ == "__main__":
  cli()
