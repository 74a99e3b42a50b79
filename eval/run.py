"""Evaluates one or more systems on the paper's benchmarks and writes resumable results.

  python -m eval.run --config=configs/eval.py:tiny
  python -m eval.run --config=configs/eval.py:checkpoint=runs/stage3,name=stage3 \\
      --config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=judge --config.limit=100

From Python (the pipeline): `eval.run.evaluate(config) -> {system: summary}`; each summary is
the dict `eval.results` writes to `<out_dir>/<system>/summary.json`. Tasks: truthfulqa_mc1,
ethics (= ethics/<subset>/<split> for every subset and `config.ethics_splits`), moral_stories,
mic, hh, hh_adv, and answer_format / answer_format_sampled: the share of held-out questions the
system answers rather than critiques, lists feedback for or echoes (eval/answer_format.py;
greedy, and sampled at `answer_format.temperature` with per-item seeds). A task whose
`<task>.json` exists for the same `limit` is skipped; a partial task continues with the items
that have no record yet.
"""

import os
import sys
import time

from absl import app
from ml_collections import config_flags
from tqdm import tqdm

from eval import answer_format, ethics, hh, items as items_lib, judge as judge_lib, metrics, mic
from eval import moral_stories, results, served as served_lib, table as table_lib, truthfulqa

MC_TASKS = ("truthfulqa_mc1", "moral_stories", "mic") + tuple(
    f"ethics/{s}/{sp}" for sp in ethics.SPLITS for s in ethics.SUBSETS)
GEN_TASKS = ("hh", "hh_adv")
FORMAT_TASKS = tuple(answer_format.TASK_COLUMNS)  # generated, classified, never judged
_FILES = {"truthfulqa_mc1": [truthfulqa.FILE], "moral_stories": [moral_stories.FILE],
          "hh": list(hh.HH_FILES), "hh_adv": [hh.HH_FILES[0], hh.ADVBENCH_FILE]}


def expand_tasks(tasks, ethics_splits=ethics.SPLITS, extra=()) -> list[str]:
  """Task names, `ethics` expanded to its subsets; `extra`: the config's extra_tasks names."""
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
  known = MC_TASKS + GEN_TASKS + FORMAT_TASKS + tuple(extra)
  out = []
  for t in filter(None, names):
    if t == "ethics":
      out += [f"ethics/{s}/{sp}" for sp in ethics_splits for s in ethics.SUBSETS]
    elif t in known:
      out.append(t)
    else:
      raise KeyError(f"unknown eval task {t!r}; known: ethics, {', '.join(known)}")
  return list(dict.fromkeys(out))


def load_task(task: str, config) -> list:
  d = os.path.expanduser(config.data_dir)
  if config.get("fetch", False):
    rels = _FILES.get(task) or ([ethics.file_of(*task.split("/")[1:])]
                                if task.startswith("ethics/") else [])
    for rel in rels:
      items_lib.fetch(d, rel)
  if task == "truthfulqa_mc1":
    return truthfulqa.load_mc1(d)
  if task == "moral_stories":
    return moral_stories.load(d, config.get("moral_stories_protocol", "choose"))
  if task == "mic":
    return mic.load(os.path.expanduser(config.mic_path))
  if task.startswith("ethics/"):
    _, subset, split = task.split("/")
    return ethics.load(d, subset, split, seed=config.seed)
  extra = config.get("extra_tasks") or {}
  if task in extra:  # a benchmark from outside eval, named by the config
    from stable_alignment_jax import plugins
    return plugins.load(extra[task]["items"], f"extra_tasks.{task}.items")()
  if task == "hh":
    return hh.load_hh(d)
  if task == "hh_adv":
    return hh.load_hh_adversarial(d, advbench=config.get("advbench", True),
                                  layout=config.get("hh_adv_layout", "paper"))
  if task in FORMAT_TASKS:
    return format_items(task, config)
  raise KeyError(task)


def format_items(task: str, config) -> list[items_lib.GenItem]:
  """The answer-format questions: `answer_format.questions` ("hh": the HH-RLHF test questions;
  else "module:function" returning question strings), less those in `exclude_file` (the
  question pool SANDBOX drew from, so no stage trained on them), the first `n` kept."""
  af = config.answer_format
  if af.questions == "hh":
    d = os.path.expanduser(config.data_dir)
    if config.get("fetch", False):
      for rel in hh.HH_FILES:
        items_lib.fetch(d, rel)
    pairs = [(it.id, it.question) for it in hh.load_hh(d)]
  else:
    from stable_alignment_jax import plugins
    questions = plugins.load(af.questions, "answer_format.questions")()
    pairs = [(f"q{n}", q) for n, q in enumerate(questions)]
  exclude = os.path.expanduser(af.get("exclude_file", ""))
  if exclude and os.path.isfile(exclude):
    with open(exclude, encoding="utf-8") as f:
      seen = {line.strip() for line in f}
    pairs = [(i, q) for i, q in pairs if q.strip() not in seen]
  elif exclude:
    print(f"{task}: exclude_file {exclude} not found; no question left out", file=sys.stderr)
  if af.n:
    pairs = pairs[:af.n]
  # the prompt is built per system (prompt_layout), so the item holds the bare question
  return [items_lib.GenItem(i, q, q, task, af.questions) for i, q in pairs]


def apply_limit(items: list, limit: int) -> list:
  """The first `limit` items (0 = all), never splitting an ETHICS exact-match group."""
  if not limit or limit >= len(items):
    return items
  out = items[:limit]
  last = getattr(out[-1], "group", None)
  if last is not None and items[limit].group == last:  # the cut falls inside a group
    out = [it for it in out if it.group != last] or [it for it in items if it.group == last]
  return out


def systems(config) -> dict[str, str]:
  out = dict(config.methods.items()) if config.get("methods") else {}
  if config.get("checkpoint"):
    out[config.get("name") or "model"] = config.checkpoint
  for name, cfg in (config.get("served") or {}).items():
    if name in out:
      raise ValueError(f"config.served.{name}: a system of that name is already in methods")
    out[name] = served_lib.spec_of(cfg)
  if not out:
    raise ValueError("nothing to evaluate: set config.methods (name -> checkpoint spec), "
                     "config.checkpoint or config.served (name -> OpenAI-compatible endpoint)")
  return out


class _Model:
  """Loads a system's weights on first use (a fully resumed system never loads them)."""

  def __init__(self, spec, config):
    self.spec, self.config, self._loaded = spec, config, None

  def get(self):
    if self._loaded is None:
      from stable_alignment_jax.checkpoints import run_dir as checkpoints
      from stable_alignment_jax.model import sharding
      mesh = sharding.make_mesh(dict(self.config.mesh))
      graphdef, state = checkpoints.load_model(self.spec, dtype=self.config.get("dtype") or None,
                                               mesh=mesh)
      from stable_alignment_jax.sampling.text_sampler import (  # the sampler's own rule
          load_spec_tokenizer)
      self._loaded = (graphdef, state,
                      load_spec_tokenizer(self.spec, self.config.get("tokenizer", "") or ""),
                      mesh)
    return self._loaded


def _run_mc(task, items, done, model, config, store, progress, column=None):
  """`column`: an extra task's table label, kept in its records so tables rebuilt from the
  stored results (eval.table) show it without the config."""
  from eval.mc_scoring import LogLikelihoodScorer
  todo = [it for it in items if it.id not in done]
  if not todo:
    return 0.0
  if isinstance(model, served_lib.ServedSystem):
    t0 = time.perf_counter()
    for s in range(0, len(todo), config.mc.chunk):
      part = todo[s:s + config.mc.chunk]
      store.append(task, [
          {"kind": "mc", "task": task, "id": it.id, "label": it.label, "group": it.group, **sc,
           **({"column": column} if column else {})} for it, sc in zip(part, model.score(part))])
    return time.perf_counter() - t0
  graphdef, state, tok, mesh = model.get()
  scorer = LogLikelihoodScorer(graphdef, state, tok, batch_size=config.mc.batch_size,
                               max_len=config.mc.max_len, mesh=mesh, progress=False)
  chunk, t0 = config.mc.chunk, time.perf_counter()
  for s in tqdm(range(0, len(todo), chunk), desc=f"{task}", unit="chunk", file=sys.stderr,
                disable=not progress):
    part = todo[s:s + chunk]
    store.append(task, [
        {"kind": "mc", "task": task, "id": it.id, "label": it.label, "group": it.group,
         "logp_sum": sc.logp_sum.tolist(), "n_tokens": sc.n_tokens.tolist(),
         **({"column": column} if column else {})}
        for it, sc in zip(part, scorer.score(part))])
  return time.perf_counter() - t0


def prompt_layout(spec: str, tok, choice: str) -> str:
  """"alpaca" or "chat_template": `choice`, or for "auto" what training used on this checkpoint
  (its run's data.prompt_format, auto resolved as training resolves it)."""
  if choice == "auto":
    from stable_alignment_jax.checkpoints import run_dir as checkpoints
    if not spec.startswith("random:") and not checkpoints.is_hf_dir(spec):
      choice = checkpoints.read_run_config(spec).get("data", {}).get("prompt_format", "auto")
  from stable_alignment_jax.data.prompt_format import resolve_prompt_format
  return resolve_prompt_format(choice, tok, {"turns": []})  # our datasets carry turns (1.1.0)


def _format_prompt(question: str, layout: str):
  from data_prep.alignment_examples import alpaca_prompt, user_turn
  if layout == "chat_template":  # the sampler renders it with the checkpoint's template
    return [{"role": "user", "content": user_turn(question)}]
  return alpaca_prompt(question)


def _run_format(task, items, recs, model, config, store, progress):
  """Answers to held-out questions in the layout the system was trained with; the records keep
  the text, and `answer_format` classifies it when the summary is built."""
  done = {r["id"] for r in recs if r["kind"] == "answer"}
  pos = {it.id: n for n, it in enumerate(items)}
  todo = [it for it in items if it.id not in done]
  if not todo:
    return 0.0
  af = config.answer_format
  temperature = af.temperature if task == "answer_format_sampled" else 0.0
  t0 = time.perf_counter()
  if isinstance(model, served_lib.ServedSystem):  # the server lays out its own chat
    outs = model.answer([it.question for it in todo], [pos[it.id] for it in todo],
                        max_tokens=af.max_new_tokens, temperature=temperature, top_p=af.top_p,
                        seed=config.seed)
    store.append(task, [{"kind": "answer", "task": task, "id": it.id, "source": it.source,
                         "question": it.question, "layout": "served_chat", **o}
                        for it, o in zip(todo, outs)])
    return time.perf_counter() - t0
  from eval.answers import AnswerGenerator
  graphdef, state, tok, mesh = model.get()
  layout = prompt_layout(model.spec, tok, af.prompt_format)
  gen = AnswerGenerator(graphdef, state, tok, max_new_tokens=af.max_new_tokens,
                        temperature=temperature,
                        top_p=af.top_p, seed=config.seed, batch_size=af.batch_size, mesh=mesh,
                        progress=False)
  step = af.batch_size * 4
  for s in tqdm(range(0, len(todo), step), desc=task, unit="chunk", file=sys.stderr,
                disable=not progress):
    part = todo[s:s + step]
    outs = gen.generate([_format_prompt(it.question, layout) for it in part],
                        [pos[it.id] for it in part])
    store.append(task, [{"kind": "answer", "task": task, "id": it.id, "source": it.source,
                         "question": it.question, "layout": layout, **o}
                        for it, o in zip(part, outs)])
  return time.perf_counter() - t0


def judged_text(answer: str) -> str:
  """What the judge rates: a realigned reply's revision (the text after the revised-response
  marker, as a realigned model revises), otherwise the whole reply."""
  if answer_format.classify(answer) == "realigned":
    return answer_format.answer_text(answer)
  return answer


def _run_gen(task, items, recs, model, config, store, judge, progress):
  answers = {r["id"]: r for r in recs if r["kind"] == "answer"}
  rated = {r["id"] for r in recs if r["kind"] == "rating"}
  pos = {it.id: n for n, it in enumerate(items)}
  todo = [it for it in items if it.id not in answers]
  t0 = time.perf_counter()
  if todo and isinstance(model, served_lib.ServedSystem):
    g = config.gen
    outs = model.answer([served_lib.chat_message(it.prompt) for it in todo],
                        [pos[it.id] for it in todo], max_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, seed=config.seed)
    new = [{"kind": "answer", "task": task, "id": it.id, "source": it.source,
            "question": it.question, **o} for it, o in zip(todo, outs)]
    store.append(task, new)
    answers.update((r["id"], r) for r in new)
  elif todo:
    from eval.answers import AnswerGenerator
    graphdef, state, tok, mesh = model.get()
    g = config.gen
    gen = AnswerGenerator(graphdef, state, tok, max_new_tokens=g.max_new_tokens,
                          temperature=g.temperature, top_p=g.top_p, seed=config.seed,
                          batch_size=g.batch_size, mesh=mesh, progress=False)
    step = g.batch_size * 4
    for s in tqdm(range(0, len(todo), step), desc=f"{task} answers", unit="chunk",
                  file=sys.stderr, disable=not progress):
      part = todo[s:s + step]
      outs = gen.generate([it.prompt for it in part], [pos[it.id] for it in part])
      new = [{"kind": "answer", "task": task, "id": it.id, "source": it.source,
              "question": it.question, **o} for it, o in zip(part, outs)]
      store.append(task, new)
      answers.update((r["id"], r) for r in new)
  to_rate = [it for it in items if it.id not in rated]
  step = max(1, judge.concurrency * 4)
  for s in tqdm(range(0, len(to_rate), step), desc=f"{task} judge", unit="chunk",
                file=sys.stderr, disable=not progress or not to_rate):
    part = to_rate[s:s + step]
    verdicts = judge.rate([(it.question, judged_text(answers[it.id]["answer"])) for it in part])
    store.append(task, [{"kind": "rating", "task": task, "id": it.id, "source": it.source,
                         **v} for it, v in zip(part, verdicts)])
  return time.perf_counter() - t0


def evaluate(config) -> dict:
  """Runs every (system, task) not yet finished; returns {system: summary}."""
  progress = config.get("progress", True)
  extra = config.get("extra_tasks") or {}
  tasks = expand_tasks(config.tasks, tuple(config.ethics_splits), tuple(extra))
  judge = None
  if any(t in GEN_TASKS for t in tasks):
    judge = judge_lib.Judge(config.judge)  # fails before any model work if misconfigured
  loaded, skipped = {}, {}
  for task in tasks:  # every file is read up front: a missing one stops the run before compute
    try:
      loaded[task] = apply_limit(load_task(task, config), config.limit)
    except FileNotFoundError as e:
      if not config.get("skip_missing", False):
        raise
      skipped[task] = str(e)
      print(f"skipping {task}: {e}", file=sys.stderr)
  out = {}
  served = config.get("served") or {}
  for name, spec in systems(config).items():
    store = results.SystemResults(os.path.join(os.path.expanduser(config.out_dir), name))
    model = (served_lib.ServedSystem(name, served[name]) if name in served else
             _Model(spec, config))
    not_scored = {}
    for task, items in loaded.items():
      if store.finished(task, config.limit):
        continue
      if isinstance(model, served_lib.ServedSystem) and task not in GEN_TASKS + FORMAT_TASKS:
        ok, why = model.mc_support()
        if not ok:
          not_scored[task] = why
          print(f"skipping {task} for {name}: {why}", file=sys.stderr)
          continue
      ids = [it.id for it in items]
      idset = set(ids)
      recs = [r for r in store.records(task) if r["id"] in idset]
      if task in GEN_TASKS:
        seconds = _run_gen(task, items, recs, model, config, store, judge, progress)
        kind, summarize = "rating", lambda rs: metrics.rating_summary([r["rating"] for r in rs])
      elif task in FORMAT_TASKS:
        seconds = _run_format(task, items, recs, model, config, store, progress)
        kind, summarize = "answer", lambda rs: answer_format.summarize([r["answer"] for r in rs])
      else:
        column = extra[task].get("column", task) if task in extra else None
        seconds = _run_mc(task, items, {r["id"] for r in recs}, model, config, store, progress,
                          column)
        kind, summarize = "mc", metrics.mc_task_summary
      latest = {r["id"]: r for r in store.records(task) if r["id"] in idset and r["kind"] == kind}
      summary = summarize(list(latest.values()))
      n_new = len(items) - len({r["id"] for r in recs
                                if r["kind"] != "answer" or task in FORMAT_TASKS})
      store.mark_finished(task, {
          "task": task, "system": name, "spec": spec, "limit": config.limit, "n": len(items),
          "summary": summary, "seconds": round(seconds, 3), "items_scored_this_run": n_new,
          "seconds_per_100": round(100 * seconds / n_new, 3) if n_new and seconds else None,
          "ids": ids})
    summary = results.rebuild_summary(store.dir)
    summary.update(system=name, spec=spec, skipped={**skipped, **not_scored},
                   judge=None if judge is None else {"model": judge.model,
                                                     "base_url": judge.base_url,
                                                     "reading": judge.reading,
                                                     "counters": dict(judge.counters)})
    results.write_summary(store.dir, summary)
    out[name] = summary
  if config.get("pairwise"):
    out["_pairwise"] = run_pairwise(config, judge or judge_lib.Judge(config.judge), tasks)
  return out


def run_pairwise(config, judge, tasks) -> dict:
  """For each "x:y" in config.pairwise: x's answers against y's on every judged task, both
  orders; win/tie/loss fractions written to <out_dir>/pairwise/<x>_vs_<y>.json."""
  base = os.path.expanduser(config.out_dir)
  out = {}
  for pair in config.pairwise.split(","):
    x, _, y = pair.strip().partition(":")
    report = {}
    for task in (t for t in tasks if t in GEN_TASKS):
      ans = [{r["id"]: r for r in results.SystemResults(os.path.join(base, s)).records(task)
              if r["kind"] == "answer"} for s in (x, y)]
      common = [i for i in ans[0] if i in ans[1]]
      verdicts = judge.compare([(ans[0][i]["question"], judged_text(ans[0][i]["answer"]),
                                 judged_text(ans[1][i]["answer"])) for i in common])
      report[task] = judge_lib.pairwise_summary([v["outcome"] for v in verdicts])
    os.makedirs(os.path.join(base, "pairwise"), exist_ok=True)
    results.write_json(os.path.join(base, "pairwise", f"{x}_vs_{y}.json"), report)
    out[f"{x}:{y}"] = report
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/eval.py:tiny")
  try:
    out = evaluate(_CONFIG.value)
  except (FileNotFoundError, items_lib.BenchmarkFileError, judge_lib.JudgeUnavailable,
          ValueError, KeyError) as e:
    print(f"eval failed: {e}\n(finished results are kept in {_CONFIG.value.out_dir})",
          file=sys.stderr)
    sys.exit(1)
  for name, summary in out.items():
    if name.startswith("_"):
      continue
    print(f"[{name}] {table_lib.printed_columns(summary)}")


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/eval.py:tiny",
                                            lock_config=True)
  app.run(main)


if __name__ == "__main__":
  cli()
