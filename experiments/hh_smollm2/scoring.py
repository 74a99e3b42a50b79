"""Log-likelihoods of replies and choices that share a context, one packed forward per batch.

A held-out HH pair is one prompt with two replies; a multiple-choice item one context with 2-13
choices. `eval.mc_scoring` runs one row per choice (the context again for every choice); here a
group of rows sharing its context is scored by the trainer's own `train.response_logprobs` with
a shared prefix (`Llama.hidden(segments=...)`), which runs the context once and each choice as
its own tail: the values of the separate rows, at a fraction of the tokens. That lets the
benchmarks' 200-item subsets and the 8 systems fit the CPU budget; the per-choice numbers are
checked against the row-by-row scorer in tests/test_hh_smollm2.py.

Choices are tokenised as `eval.mc_scoring` does: the tokens `context + choice` adds after
`context` alone (so a leading space merges as in running text), BOS first where the tokenizer
adds one. A group longer than `max_len` loses context tokens from the left, counted.
"""

import functools
import sys
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from stable_alignment_jax.training import train


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix", "chunk"))
def _group_logprobs(graphdef, params, tokens, loss_mask, response_mask, *, prefix: int,
                    chunk: int):
  batch = {"tokens": tokens, "loss_mask": loss_mask, "response_mask": response_mask}
  return train.response_logprobs(graphdef, params, batch, logprob_chunk=chunk,
                                 shared_prefix=prefix)


class GroupScorer:
  """Sums and counts of log p(choice tokens | context) for groups (context ids, [choice ids]).

  batch_tokens: about how many packed positions one forward may hold (sets groups per batch);
  max_len: the longest unpacked row (context + one choice)."""

  def __init__(self, graphdef, state, *, max_len: int, batch_tokens: int = 2048,
               logprob_chunk: int = 64, progress: bool = True, desc: str = "score"):
    self.graphdef, self.state = graphdef, state
    self.max_len, self.batch_tokens, self.chunk = max_len, batch_tokens, logprob_chunk
    self.progress, self.desc = progress, desc
    self.truncated = 0  # groups that lost context tokens to fit max_len

  def _fit(self, ctx: list[int], choices: list[list[int]]) -> list[int]:
    longest = max(len(c) for c in choices)
    if longest >= self.max_len:
      raise ValueError(f"a choice of {longest} tokens does not fit max_len {self.max_len}")
    if len(ctx) + longest > self.max_len:
      self.truncated += 1
      ctx = ctx[len(ctx) + longest - self.max_len:]
    return ctx

  def score(self, groups: Sequence[tuple[list[int], list[list[int]]]]
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(logp_sum [C], n_tokens [C])] in the order of `groups`."""
    groups = [(self._fit(list(c), [list(x) for x in ch]), [list(x) for x in ch])
              for c, ch in groups]
    # Similar groups together: few padded slots, few compiled shapes (K, T and P are bucketed).
    order = sorted(range(len(groups)), key=lambda i: (len(groups[i][1]), len(groups[i][0])))
    out: list = [None] * len(groups)
    batches, cur = [], []
    for i in order:
      k = len(groups[i][1])
      t = len(groups[i][0]) + max(len(c) for c in groups[i][1])
      if cur and (len(groups[cur[0]][1]) != k or (len(cur) + 1) * k * t > self.batch_tokens):
        batches.append(cur)
        cur = []
      cur.append(i)
    if cur:
      batches.append(cur)
    for idx in tqdm(batches, desc=self.desc, unit="batch", file=sys.stderr,
                    disable=not self.progress or not batches):
      sums, counts = self._run([groups[i] for i in idx])
      for r, i in enumerate(idx):
        c = len(groups[i][1])
        out[i] = (sums[r, :c].astype(np.float64), np.rint(counts[r, :c]).astype(np.int64))
    return out

  def _run(self, part):
    k = max(len(ch) for _, ch in part)
    t = max(len(ctx) + max(len(c) for c in ch) for ctx, ch in part)
    t = -(-t // 32) * 32
    prefix = min(len(ctx) for ctx, _ in part)
    prefix = max(1, prefix // 16 * 16) if prefix >= 16 else 0  # bucketed; 0 = unpacked
    b = 1 << (len(part) - 1).bit_length()  # few batch shapes
    tokens = np.zeros((b, k, t), np.int32)
    mask = np.zeros((b, k, t), np.float32)
    rmask = np.zeros((b, k), np.float32)
    for r, (ctx, ch) in enumerate(part):
      for j in range(k):
        tokens[r, j, :len(ctx)] = ctx  # empty slots keep the context, so the prefix is shared
      for j, c in enumerate(ch):
        tokens[r, j, len(ctx):len(ctx) + len(c)] = c
        mask[r, j, len(ctx):len(ctx) + len(c)] = 1.0
        rmask[r, j] = 1.0
    sums, counts = _group_logprobs(self.graphdef, self.state, tokens, mask, rmask,
                                   prefix=prefix, chunk=self.chunk)
    return np.asarray(sums), np.asarray(counts)


def mc_group(tok, context: str, choice_texts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
  """An MC item's (context ids, [choice ids]) as `eval.mc_scoring.LogLikelihoodScorer.encode_pair`
  tokenises each (context, choice) row."""
  ctx = tok.encode(context)
  bos = [tok.bos_id] if getattr(tok, "add_bos", True) and tok.bos_id >= 0 else []
  choices = []
  for choice in choice_texts:
    whole = tok.encode(context + choice)
    if len(whole) <= len(ctx) or whole[:len(ctx)] != ctx:
      choices.append(tok.encode(choice))  # the context's last token merged with the choice
    else:
      choices.append(whole[len(ctx):])
  return bos + ctx, choices


def pair_group(fmt, ex: dict) -> tuple[list[int], list[list[int]]]:
  """A preference pair as training renders it (`data.encode_example`): the prompt ids of the
  prompt format, then each reply with its end of turn."""
  return fmt.prompt_ids(ex), [fmt.response_ids(r) for r in ex["responses"]]
