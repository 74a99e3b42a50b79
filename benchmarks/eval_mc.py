"""Multiple-choice scoring speed: seconds per 100 TruthfulQA MC1 questions, and the batched
scorer (eval/mc_scoring.py) against a naive one-row-at-a-time full forward, side by side.

  python benchmarks/eval_mc.py [--questions=100] [--preset=bench]

The model is random (speed does not depend on the weights) with the preset's shape and the
LLaMA-2 SentencePiece vocabulary (32000) so rows have realistic token counts; compile time is
measured apart (a first pass over the same shapes). The two sides alternate (`--reps` rounds);
min and median of each are printed, the naive baseline is checked against its one jitted
forward timed alone x rows, and the load average is printed around the run (flagged above 1.0;
benchmarks/common.py).
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval import truthfulqa
from eval.mc_scoring import LogLikelihoodScorer
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset
from stable_alignment_jax.data.tokenizer import load_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def naive_scorer(graphdef):
  """Per row: full [1, T, V] logits, log-softmax, sum over the choice tokens. Returns
  (score(state, rows), the jitted per-row forward)."""
  @jax.jit
  def logp(state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return jax.nn.log_softmax(logits[0], -1)

  def padded(ids):
    t = -(-len(ids) // 64) * 64  # padded like the scorer, so compiles are comparable
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :len(ids)] = ids
    return jnp.asarray(tokens)

  def score(state, rows):
    out = []
    for ids, k in rows:
      lp = np.asarray(logp(state, padded(ids)))
      out.append(sum(lp[i - 1, ids[i]] for i in range(len(ids) - k, len(ids))))
    return np.asarray(out)

  return score, logp, padded


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--questions", type=int, default=100)
  p.add_argument("--preset", default="bench")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--reps", type=int, default=2, help="alternated rounds of both sides")
  p.add_argument("--json", default="")
  a = p.parse_args()
  with common.Run("eval_mc", a.json) as run:
    _main(a, run)


def _main(a, run):
  tok = load_tokenizer(os.path.join(DATA, "tokenizers", "llama2_tokenizer.model"))
  cfg = preset(a.preset, vocab_size=tok.vocab_size, dtype="float32")
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, state = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  items = truthfulqa.load_mc1(DATA)[:a.questions]
  scorer = LogLikelihoodScorer(graphdef, state, tok, batch_size=a.batch_size, mesh=mesh,
                               progress=False)
  rows = [scorer.encode_pair(it.context, c) for it in items for c in it.choices]
  run.row("model", f"{a.preset}: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}; "
          f"{len(items)} questions, {len(rows)} rows, mean "
          f"{np.mean([len(r[0]) for r in rows]):.0f} tokens/row; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
  t0 = time.perf_counter()
  got = scorer.score(items)
  first = time.perf_counter() - t0
  sub = rows[:60]  # the naive loop is slow: time it on the first rows and scale per row
  naive, logp, padded = naive_scorer(graphdef)
  ref = naive(state, sub)  # compile every shape the timed rows use
  scale = len(rows) / len(sub)
  times = common.alternate({"batched": lambda: scorer.score(items),
                            "naive": lambda: naive(state, sub)}, a.reps)
  per100 = lambda s: 100 * s / len(items)
  run.row("batched scorer s/100 questions", common.summary([per100(x) for x in times["batched"]])
          + f"; first pass incl. compile {first:.1f} s")
  run.row("naive per-row s/100 questions", common.summary(
      [per100(x * scale) for x in times["naive"]]) + f"; scaled from {len(sub)} rows")
  # The naive side's own part: its forward at the rows' most common padded length, alone.
  shape = collections.Counter(padded(ids).shape[1] for ids, _ in sub).most_common(1)[0][0]
  x = padded(next(ids for ids, _ in sub if padded(ids).shape[1] == shape))
  jax.block_until_ready(logp(state, x))
  one = min(common.timed(lambda: jax.block_until_ready(logp(state, x)))[0] for _ in range(5))
  run.check(*common.sanity("naive loop", min(times["naive"]), one * len(sub)))
  flat = np.concatenate([g.logp_sum for g in got])[:len(sub)]
  run.row("max |diff| batched vs naive", f"{np.max(np.abs(flat - ref)):.2e}")
  run.row("speed-up batched / naive", f"{min(times['naive']) * scale / min(times['batched']):.1f}x"
          f" (medians {common.stats(times['naive'])['median'] * scale / common.stats(times['batched'])['median']:.1f}x)")


if __name__ == "__main__":
  main()
