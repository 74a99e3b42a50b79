"""Multiple-choice scoring by log-likelihood with our model.

Every (context, choice) pair of a set of questions becomes one row `context + choice`, behind a
BOS only where the tokenizer itself adds one (LLaMA's SentencePiece does, SmolLM2's BPE does not;
lm-evaluation-harness follows the tokenizer the same way); the
score of a choice is the sum of log p(token | everything before it) over the choice's tokens,
reported beside that sum divided by the number of choice tokens (length-normalised). Rows from
all questions are sorted by length and cut into fixed-size batches padded to a few length
buckets, so each batch is one jitted forward over a padded [N, T] array and a handful of shapes
are compiled. With a mesh the batch is split over the data-parallel axes like training.

Tokenisation follows the usual convention: the choice's tokens are those that the tokenisation of
`context + choice` adds after the tokenisation of `context` alone, so a leading space merges as
the tokenizer would merge it in running text. Rows longer than the model context lose tokens
from the left of the context (never from the choice).
"""

import dataclasses
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from eval.items import MCItem
from stable_alignment_jax.model import logprobs


@dataclasses.dataclass
class ChoiceScores:
  logp_sum: np.ndarray  # [C] float64
  n_tokens: np.ndarray  # [C] int

  @property
  def logp_mean(self) -> np.ndarray:
    return self.logp_sum / np.maximum(self.n_tokens, 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "k_max", "chunk"))
def _rows_logprob(graphdef, state, tokens, start, length, *, k_max: int, chunk: int = 0):
  """Sum of log p over each row's scored tokens.

  tokens [N, T] right-padded with -1; row n scores tokens start[n] .. start[n]+length[n]-1,
  each predicted by the hidden state one position earlier. Returns (sum [N], count [N]).
  chunk > 0: the head runs over that many choice positions at a time (`model.logprobs`), so at
  most [N, chunk, V] logits exist; 0: all k_max at once.
  """
  model = nnx.merge(graphdef, state)
  valid = tokens >= 0
  safe = jnp.where(valid, tokens, 0)
  # Only the choice positions are projected onto the vocabulary: with a 32k+ vocabulary the full
  # [N, T, V] logits would dominate time and memory, while a choice is a few tokens of a row.
  h, _ = model.hidden(safe, key_mask=valid)  # [N, T, D]
  j = jnp.arange(k_max)[None, :]
  target_pos = jnp.clip(start[:, None] + j, 0, tokens.shape[1] - 1)  # [N, K]
  h_k = jnp.take_along_axis(h, jnp.maximum(target_pos - 1, 0)[..., None], axis=1)  # [N, K, D]
  targets = jnp.take_along_axis(safe, target_pos, 1)  # [N, K]
  m = (j < length[:, None]).astype(jnp.float32)
  logp = logprobs.target_logprobs(h_k, model.logits, targets, chunk=chunk, mask=m)  # [N, K]
  return jnp.sum(logp * m, axis=-1), jnp.sum(m, axis=-1)


class LogLikelihoodScorer:
  """Scores choices of `MCItem`s with one model. `tokenizer` as in `tokenizer.load_tokenizer`.

  logprob_chunk: choice positions projected onto the vocabulary at a time (0 = a batch's
  longest choice at once). With a 128k vocabulary, 32 rows of 64-token choices would be 1 GiB of
  f32 logits; 16 positions keep them to 256 MiB, and each chunk's head matmul still covers
  batch_size * 16 tokens, enough to keep the chip busy."""

  def __init__(self, graphdef, state, tokenizer, *, batch_size: int = 32, max_len: int = 0,
               mesh=None, bucket: int = 64, progress: bool = True, logprob_chunk: int = 16):
    self.graphdef, self.state, self.tok = graphdef, state, tokenizer
    self.logprob_chunk = logprob_chunk
    cfg = nnx.merge(graphdef, state).cfg
    self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    self.mesh, self.bucket, self.progress = mesh, bucket, progress
    if mesh is not None:
      from stable_alignment_jax.model import sharding
      n = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
      batch_size = -(-batch_size // n) * n  # a whole number of rows per data-parallel device
    self.batch_size = batch_size
    self.truncated = 0  # rows that lost context tokens to fit max_len

  @property
  def add_bos(self) -> bool:
    return bool(getattr(self.tok, "add_bos", True)) and self.tok.bos_id >= 0

  def encode_pair(self, context: str, choice: str) -> tuple[list[int], int]:
    """(token ids, BOS first where the tokenizer adds one; number of trailing choice tokens)."""
    ctx = self.tok.encode(context)
    whole = self.tok.encode(context + choice)
    n_choice = len(whole) - len(ctx)
    if n_choice <= 0 or whole[:len(ctx)] != ctx:
      # The context's last token merged with the choice: score the choice encoded on its own.
      whole, n_choice = ctx + self.tok.encode(choice), len(self.tok.encode(choice))
    ids = [self.tok.bos_id] * self.add_bos + whole
    if len(ids) > self.max_len:
      self.truncated += 1
      if n_choice >= self.max_len:
        raise ValueError(f"a choice of {n_choice} tokens does not fit the model context "
                         f"{self.max_len}: {choice[:80]!r}")
      ids = ids[len(ids) - self.max_len:]
    return ids, n_choice

  def score_rows(self, rows: Sequence[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
    """rows: (ids, n_target) pairs. Returns (logp_sum [R], n_tokens [R])."""
    n = len(rows)
    out_sum, out_cnt = np.zeros(n), np.zeros(n, np.int64)
    order = sorted(range(n), key=lambda i: -len(rows[i][0]))
    starts = range(0, n, self.batch_size)
    for s in tqdm(starts, desc="mc score", unit="batch", disable=not self.progress or n == 0,
                  file=sys.stderr):
      idx = order[s:s + self.batch_size]
      t = min(self.max_len, -(-len(rows[idx[0]][0]) // self.bucket) * self.bucket)
      tokens = np.full((self.batch_size, t), -1, np.int32)  # -1 = padding
      start = np.ones(self.batch_size, np.int32)
      length = np.zeros(self.batch_size, np.int32)
      for r, i in enumerate(idx):
        ids, k = rows[i]
        tokens[r, :len(ids)] = ids
        start[r], length[r] = len(ids) - k, k
      tokens[len(idx):, 0] = 0  # empty rows hold one token so attention has a key
      k_max = max(8, 1 << (int(length.max()) - 1).bit_length())  # few compiled shapes
      sums, counts = self._run(tokens, start, length, k_max)
      out_sum[idx] = np.asarray(sums)[:len(idx)]
      out_cnt[idx] = np.rint(np.asarray(counts)[:len(idx)]).astype(np.int64)
    return out_sum, out_cnt

  def _run(self, tokens, start, length, k_max):
    kw = {"k_max": k_max, "chunk": self.logprob_chunk}
    if self.mesh is None:
      return _rows_logprob(self.graphdef, self.state, tokens, start, length, **kw)
    from stable_alignment_jax.model import sharding
    put = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))
    with sharding.activate(self.mesh):
      return _rows_logprob(self.graphdef, self.state, put(tokens), put(start), put(length), **kw)

  def score(self, items: Sequence[MCItem]) -> list[ChoiceScores]:
    rows = []
    for item in items:
      for choice in item.choices:
        rows.append(self.encode_pair(item.context, choice))
    sums, counts = self.score_rows(rows)
    out, pos = [], 0
    for item in items:
      c = len(item.choices)
      out.append(ChoiceScores(sums[pos:pos + c], counts[pos:pos + c]))
      pos += c
    return out
