"""The HH-RLHF experiment as pipeline steps (`experiments/hh_smollm2/config.py` names this class).

Order: start model -> split -> learning-rate probe -> eval of the start -> per data-order seed
(seed-major, so a partial run has whole seeds): SFT (first `sft_seeds` seeds), DPO, SA-CPO, each
trained from the start and evaluated on the held-out pairs and the answer format -> the
benchmarks for the start and the first `bench_seeds` seeds of each method -> report. Every step is in the pipeline's ledger
(`{out}/pipeline_state.json`), so a killed run resumes at the step it was in; the report is
rewritten from whatever has finished.
"""

import json
import os
import time

import numpy as np

from stable_alignment_jax.recipes import pipeline
from experiments.hh_smollm2 import evaluate, report, split


class HhPipeline(pipeline.Pipeline):

  def make_start(self) -> dict:
    """The start as a checkpoint spec every step reads: the GGUF dequantized to an HF dir, or a
    random preset saved as a run directory (the toy config)."""
    c = self.c
    if c.start.startswith("random:"):
      from flax import nnx
      from stable_alignment_jax.checkpoints import run_dir as checkpoints
      graphdef, state = checkpoints.load_model(c.start)
      cfg = nnx.merge(graphdef, state).cfg
      d = checkpoints.save_model(cfg, state, self.path("start"), tokenizer="byte",
                                 source=c.start)
      return {"dir": d, "tokenizer": "byte"}
    if c.start:
      return {"dir": c.start, "tokenizer": c.start}
    from stable_alignment_jax.model import gguf
    d = self.path("start_hf")
    if not os.path.exists(os.path.join(d, "config.json")):
      gguf.to_hf(c.gguf, d)
    return {"dir": d, "tokenizer": d}

  def _fmt(self, start: dict):
    from stable_alignment_jax.data import tokenizer as tok_lib
    from stable_alignment_jax.data.prompt_format import PromptFormat, resolve_prompt_format
    tok = tok_lib.load_tokenizer(start["tokenizer"])
    name = resolve_prompt_format(self.c.train.data.prompt_format, tok, {"turns": []})
    return PromptFormat(tok, name)

  def make_split(self, start: dict) -> dict:
    c = self.c
    pairs, files = split.read_pairs(c.hh_dir)
    train, test = split.split_pairs(pairs, c.held_out)
    shared = {e["question"] for e in train} & {e["question"] for e in test}
    if shared:  # cannot happen by construction; checked because everything rests on it
      raise AssertionError(f"{len(shared)} questions on both sides of the split")
    fmt = self._fmt(start)
    # A fixed pseudo-random order of the held-out side: its question hash (then file order).
    test = sorted(test, key=lambda e: split.bucket(e["question"]))
    fitting = [e for e in test if split.fits(e, fmt, c.eval_max_len)]
    eval_pairs = fitting[:c.n_pairs]
    questions, seen = [], set()
    for e in test:
      if e["turns"] and e["question"] not in seen:
        seen.add(e["question"])
        questions.append(e["turns"][0])
    d = self.path("split")
    os.makedirs(d, exist_ok=True)
    # Only pairs whose prompt and both whole replies fit the training max_len are trained on:
    # the loader leaves out a reply that does not fit (never cuts it), and a pair that loses
    # one reply has no preference left. `train_counts` says what the whole split would lose.
    train_fit = [e for e in train if split.fits(e, fmt, c.train.data.max_len)]
    split.write_jsonl(os.path.join(d, "train.jsonl"), train_fit)
    split.write_jsonl(os.path.join(d, "validation.jsonl"), eval_pairs)
    with open(os.path.join(d, "questions.json"), "w") as f:
      json.dump(questions[:c.n_questions], f, indent=1)
    return {"dir": d, "files": files, "format": fmt.name, "pairs": len(pairs),
            "train_pairs": len(train), "train_fitting": len(train_fit),
            "held_out_pairs": len(test),
            "train_questions": len({e["question"] for e in train}),
            "held_out_questions": len({e["question"] for e in test}),
            "shared_questions": len(shared), "held_out_fitting": len(fitting),
            "eval_pairs": len(eval_pairs), "questions": min(len(questions), c.n_questions),
            "train_counts": split.token_counts(train, fmt, c.train.data.max_len),
            "eval_subset": {e["source"]: sum(x["source"] == e["source"] for x in eval_pairs)
                            for e in eval_pairs}}

  def train_cfg(self, start: dict, data: dict, loss: str, seed: int, lr: float, name: str,
                steps: int | None = None):
    s = pipeline.copy_config(self.c.train)
    s.loss.name, s.seed, s.optim.lr = loss, seed, lr
    s.data.data_dir, s.data.tokenizer = data["dir"], start["tokenizer"]
    s.checkpoint.dir, s.checkpoint.init_from = self.path(name), start["dir"]
    if steps:
      s.train.steps = s.checkpoint.save_every = steps
    return s

  def probe(self, start: dict, data: dict) -> dict:
    """SFT at each candidate lr (constant: no warmup or decay) on the train split, the same
    batches for each; the lowest mean train loss over the second half of the steps wins (each
    batch is new to the model, so that loss is out-of-sample)."""
    curves = {}
    for lr in self.c.probe_lrs:
      name = f"probe_lr{lr:g}"
      cfg = self.train_cfg(start, data, "sft", self.c.probe_seed, lr, name,
                           steps=self.c.probe_steps)
      cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio = 0.0, 1.0
      self.steps.run(name, lambda cfg=cfg: pipeline.train_stage(cfg))
      curves[f"{lr:g}"] = report.read_curve(self.path(name))
    tail = {lr: float(np.mean([r["loss"] for r in cur[len(cur) // 2:]]))
            for lr, cur in curves.items()}
    best = min(tail, key=tail.get)
    return {"lr": float(best), "tail_loss": tail, "curves": curves,
            "rule": f"SFT at constant lr for {self.c.probe_steps} steps on the train split, the "
                    "same batches for each candidate; lowest mean train loss over the second "
                    "half of the steps"}

  def evaluate_one(self, name: str, spec: str, start: dict, data: dict,
                   bench_only: bool = False) -> dict:
    """The held-out pairs and the answer format (step eval_<name>), or the benchmarks alone
    (step bench_<name>, written to <name>_bench.json)."""
    c = self.c
    with open(os.path.join(data["dir"], "validation.jsonl")) as f:
      pairs = [json.loads(line) for line in f]
    with open(os.path.join(data["dir"], "questions.json")) as f:
      questions = json.load(f)
    path = self.path("eval", f"{name}{'_bench' if bench_only else ''}.json")
    if bench_only and os.path.exists(path):  # written whole (os.replace) by a worker beside
      with open(path) as f:                  # this run: the same measurement, not redone
        return {"file": path, "seconds": json.load(f)["seconds"]}
    bench = {}
    if bench_only:
      pairs = questions = None
      bench = evaluate.benchmark_items(c.data_dir, c.n_bench, c.bench_seed)
    t0 = time.time()
    out = evaluate.evaluate(spec, start["tokenizer"], pairs, bench, questions,
                            prompt_format=data["format"], max_len=c.eval_max_len,
                            batch_tokens=c.batch_tokens, max_new_tokens=c.max_new_tokens,
                            gen_batch=c.gen_batch)
    out["seconds"] = round(time.time() - t0, 1)
    out["loadavg"] = list(os.getloadavg())  # the machine is shared: how busy it was
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(out, f)
    os.replace(path + ".tmp", path)
    return {"file": path, "seconds": out["seconds"]}

  def run(self) -> dict:
    c = self.c
    t0 = time.time()
    start = self.steps.run("start", self.make_start)
    data = self.steps.run("split", lambda: self.make_split(start))
    if c.lr > 0:
      lr = c.lr
    else:
      lr = self.steps.run("lr_probe", lambda: self.probe(start, data))["lr"]
    self.steps.run("eval_start", lambda: self.evaluate_one("start", start["dir"], start, data))
    benched = [("start", start["dir"])]
    for i, seed in enumerate(c.seeds):
      for method in c.methods:
        if method == "sft" and i >= c.sft_seeds:
          continue
        run = f"{method}_s{seed}"
        cfg = self.train_cfg(start, data, method, seed, lr, run)
        d = self.steps.run(run, lambda cfg=cfg: pipeline.train_stage(cfg))["dir"]
        self.steps.run(f"eval_{run}", lambda d=d, run=run: self.evaluate_one(run, d, start,
                                                                               data))
        if i < c.bench_seeds:
          benched.append((run, d))
    # The benchmarks last: the pair metrics of every seed come first, and a run cut short by
    # time still has them.
    if c.n_bench:
      for run, d in benched:
        self.steps.run(f"bench_{run}", lambda d=d, run=run: self.evaluate_one(
            run, d, start, data, bench_only=True))
    out = report.write(self.steps.done, c, self.path("report"))
    report.copy_to(self.path("report"), c.docs_dir)
    print(out["markdown"], flush=True)
    print(f"[hh_smollm2] this run {time.time() - t0:.0f}s; report in {c.docs_dir}", flush=True)
    return out
