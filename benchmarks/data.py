"""Data path speed: building the paper-sized alignment data, and the grain loader vs the trainer.

Measured in one run on this machine, against the targets set for the data path:
  * a synthetic SANDBOX export the size of the paper's data (169k examples: 48.8k imitation,
    94.6k self-critic, 25.6k realignment) builds with `data_prep.build` in under a minute;
  * the grain pipeline's batches/s over the trainer's steps/s on the tiny config, same batch
    shape (stage 1 tiny: 8 prompts x K=3 x T=160, SentencePiece BPE trained here on the built
    data with the tiny model's vocabulary size), is at least 10.

  python benchmarks/data.py [--out /tmp/sa_bench] [--records 94600] [--train_steps 30]

The trainer's figure is its logged tokens/s over the last intervals (min/median of the logged
intervals); the loader is timed in `--loader_rounds` chunks (min/median), and checked against an
independent figure: the mean time of the same number of batches drawn right after the trainer.
The load average is printed before, between and after (benchmarks/common.py; flagged above 1.0).

The export is made up (seeded): every record has one draft (one self-critic example with 3-4
rated peers), questions are shared by ~2 records (48.8k imitation examples), and 27% of
revisions improve above 4 (25.6k realignment examples).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.one_cpu_device()  # before jax is imported

from data_prep import build as build_lib  # noqa: E402
from data_prep import tokenizer as tok_train  # noqa: E402

PAPER = {"imitation": 48_800, "self_critic": 94_600, "realignment": 25_600}
_WORDS = ("honest kind people help should never would harm others respect safe law ask "
          "friend money lie truth family careful think feel better worse rule trust").split()


class _Text:
  """Made-up sentences drawn from a pre-built pool (drawing words one by one is slow)."""

  def __init__(self, rng, pool: int = 4096):
    self.rng = rng
    self.pool = {n: [" ".join(rng.choice(_WORDS, size=n)).capitalize() + "."
                     for _ in range(pool)] for n in (12, 20, 60)}

  def __call__(self, n: int) -> str:
    return self.pool[n][int(self.rng.integers(len(self.pool[n])))]


def synthetic_export(path: str, n_records: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  text = _Text(rng)
  n_questions = round(n_records * PAPER["imitation"] / PAPER["self_critic"])
  questions = [f"Question {q}: {text(12)}" for q in range(n_questions)]
  pass_rate = PAPER["realignment"] / PAPER["self_critic"]
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n_records):
      # Records i and i + n_questions share a question; the rest are alone.
      if rng.random() < pass_rate:  # revision better than the draft and above 4
        before = float(rng.integers(1, 6))
        after = float(rng.integers(max(before, 4) + 1, 8))
      else:
        after = float(rng.integers(1, 8))
        before = float(rng.integers(int(after), 8))
      peers = [{"peer": p, "rating": int(rng.integers(1, 8)), "reason": text(20)}
               for p in range(int(rng.integers(3, 5)))]
      rec = {"run_id": "bench", "round": i // 100, "agent": 100 + i % 100,
             "agent_model": "synthetic", "question": questions[i % n_questions],
             "draft": {"text": f"Draft {i}. " + text(60), "moral": before, "engagement": None},
             "feedback": peers,
             "revised": {"text": f"Revision {i}. " + text(60), "moral": after,
                         "engagement": 5.0}}
      f.write(json.dumps(rec) + "\n")


def trainer_steps_per_s(out_dir: str, tokenizer_path: str, steps: int) -> tuple[float, dict]:
  """stage1 tiny on the built imitation data: steps/s over the last log interval (compiled)."""
  from configs import stage1
  from stable_alignment_jax.training import train
  c = stage1.get_config("tiny")
  c.data.source = "tfds"
  c.data.data_dir = out_dir
  c.data.tokenizer = tokenizer_path
  c.train.steps = steps
  c.train.log_every = steps // 3
  c.train.eval_every = 0
  c.train.tensorboard = False
  c.checkpoint.dir = os.path.join(out_dir, "run")
  c.checkpoint.save_every = 10 * steps
  shutil.rmtree(c.checkpoint.dir, ignore_errors=True)
  result = train.run(c)
  with open(os.path.join(c.checkpoint.dir, "metrics.jsonl")) as f:
    logs = [json.loads(line) for line in f]
  # Every interval after the first (the first holds the compile).
  tokens_per_s = [m["tokens_per_s"] for m in logs if m["split"] == "train"][1:]
  tokens_per_step = c.data.batch_size * c.data.num_responses * c.data.max_len
  shape = dict(batch=c.data.batch_size, K=c.data.num_responses, T=c.data.max_len,
               kept=result["data"]["kept"], dropped=result["data"]["dropped"])
  return [x / tokens_per_step for x in tokens_per_s], shape


def loader_batches_per_s(out_dir: str, tokenizer_path: str, shape: dict, n: int,
                         rounds: int = 3) -> list[float]:
  from stable_alignment_jax.data import loader as data
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  src = data.open_tfds("sandbox_alignment/imitation", out_dir, "train")
  loader = data.make_loader(src, load_tokenizer(tokenizer_path), global_batch_size=shape["batch"],
                            max_len=shape["T"], num_responses=shape["K"], seed=0,
                            shard_index=0, shard_count=1)
  it = iter(loader)
  next(it)  # first batch: permutation and reader start-up
  out = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(n):
      next(it)
    out.append(n / (time.perf_counter() - start))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="/tmp/sa_bench")
  ap.add_argument("--records", type=int, default=PAPER["self_critic"])
  ap.add_argument("--train_steps", type=int, default=30)
  ap.add_argument("--loader_batches", type=int, default=300)
  ap.add_argument("--loader_rounds", type=int, default=3)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  export = os.path.join(args.out, "export.jsonl")
  with common.Run("data", args.json) as run:
    t = time.perf_counter()
    synthetic_export(export, args.records)
    run.row("synthetic export", f"{args.records} records, {os.path.getsize(export) / 1e6:.0f} MB "
            f"in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    card = build_lib.build([export], os.path.join(args.out, "tfds"))
    wall = time.perf_counter() - t
    counts = {k: d["examples"] for k, d in card["datasets"].items()}
    run.row("build", f"{card['examples']} examples {counts} in {wall:.1f}s wall "
            f"({card['examples'] / wall:.0f} examples/s); under a minute: {wall < 60}")
    run.mark("after build")

    t = time.perf_counter()
    tok_path = tok_train.train([os.path.join(args.out, "tfds", "sandbox_alignment", "imitation")],
                               os.path.join(args.out, "tok", "sp384"), vocab_size=384,
                               max_sentences=200_000)
    run.row("tokenizer", f"SentencePiece BPE, 384 pieces, trained in "
            f"{time.perf_counter() - t:.1f}s")

    tfds_dir = os.path.join(args.out, "tfds")
    steps_per_s, shape = trainer_steps_per_s(tfds_dir, tok_path, args.train_steps)
    run.mark("after the trainer")
    batches_per_s = loader_batches_per_s(tfds_dir, tok_path, shape, args.loader_batches,
                                         args.loader_rounds)
    # The independent figure: one long draw of as many batches as all the rounds together.
    whole = loader_batches_per_s(tfds_dir, tok_path, shape,
                                 args.loader_batches * args.loader_rounds, 1)[0]
    run.row("batch shape", str(shape))
    inv = lambda xs: [1 / x for x in xs]
    run.row("trainer s/step", common.summary(inv(steps_per_s)) + " (stage1 tiny, 1 CPU device; "
            "logged intervals after the first)")
    run.row("loader s/batch", common.summary(inv(batches_per_s)) + " (same source, tokenizer, "
            "shape)")
    run.check(*common.sanity("loader (median chunk)", 1 / statistics.median(batches_per_s),
                             1 / whole))
    run.row("loader / trainer", f"{max(batches_per_s) / max(steps_per_s):.1f} of the best, "
            f"{statistics.median(batches_per_s) / statistics.median(steps_per_s):.1f} of the "
            "medians (want >= 10)")


if __name__ == "__main__":
  main()
