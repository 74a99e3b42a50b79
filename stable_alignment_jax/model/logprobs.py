"""Log-probabilities of tokens under the model's head: the one path every caller takes.

`target_logprobs` turns final hidden states and the LM head into log softmax(logits)[target] per
position; the preference losses (policy and reference, `sequence_logprobs`), PPO's per-token
logp / old_logp / ref_logp, and the MC scorer all call it. The sampler's next-token scores need
the log-softmax at a set of ids (the whole vocabulary for top_logprobs), not at one target per
position: `vocab_logprobs` reads the same `log_softmax`.

Memory: a [N, T, V] f32 logits array is the largest tensor of a step (and its softmax gradient
another as large). With `chunk` > 0 the positions are cut into chunks (`chunk_plan`) that
`lax.map` runs one at a time under `jax.checkpoint`: the head, logsumexp and target pick of a
chunk happen together and the backward pass recomputes that chunk's logits instead of keeping
them, so at most N * chunk * V * 4 bytes of logits (and as much gradient) exist at once.

The chunks cut time, with the whole vocabulary in each, rather than the vocabulary: the
logsumexp of a row is then one exact reduction (no running max and rescaled sums across vocab
chunks), the head stays one matmul whose vocab dimension keeps its tensor-parallel sharding
(`axes.ACT_VOCAB`), each chunk keeps every row and so the rows' sharding over the batch axes,
and a chunk whose positions are all prompt or padding skips the head entirely.
"""

from typing import Callable

import jax
import jax.numpy as jnp


def chunk_plan(t: int, chunk: int) -> tuple[int, int]:
  """(number of chunks, positions per chunk) for T positions in chunks of at most `chunk`.

  The chunks are made as even as possible, so the padding is under one position per chunk
  (T=360, chunk=128: 3 chunks of 120, none padded; fixed chunks of 128 would waste 24)."""
  n_chunks = -(-t // max(min(chunk, t), 1))
  return n_chunks, -(-t // n_chunks)


def log_softmax(logits: jax.Array) -> jax.Array:
  """log softmax over the vocabulary (the last axis), in f32: what both the per-target pick and
  the sampler's scores at chosen ids read."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _picked_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[..., target]: [..., V], [...] -> f32 [...]. The target is picked by a
  one-hot select that fuses into a reduction instead of a gather (whose gradient is a scatter),
  and from the log-softmax rather than as logit - logsumexp: on XLA:CPU the latter keeps a
  second logits-sized buffer in the forward pass (2 L instead of 1 L for L the logits' bytes;
  the same 3 L either way under jax.grad; benchmarks/ppo_memory.py)."""
  hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
  return jnp.sum(jnp.where(hit, log_softmax(logits), 0.0), axis=-1)


def target_logprobs(hidden: jax.Array, head_fn: Callable, targets: jax.Array, *, chunk: int = 0,
                    mask: jax.Array | None = None) -> jax.Array:
  """log softmax(head_fn(hidden))[target] at every position: f32 [N, S].

  hidden [N, S, D]; targets [N, S] int, the token each position's hidden state predicts (no
  shift here); head_fn maps [n, c, D] -> logits [n, c, V] (`Llama.logits`).
  chunk: positions per chunk (module docstring); 0 runs the head over all S positions at once,
    so the whole [N, S, V] logits exist.
  mask [N, S], optional, chunked only: a chunk where it is zero in every row (all prompt, or all
    padding, across the batch) skips the head and gives 0 there. Positions are not masked
    otherwise: the caller weights them.

  Chunks run over positions, not rows, so each one keeps every row and the rows' sharding over
  the batch axes (a chunk of rows would cut across devices).
  """
  targets = targets.astype(jnp.int32)
  if chunk <= 0:
    return _picked_logprobs(head_fn(hidden), targets)
  n, s, _ = hidden.shape
  n_chunks, size = chunk_plan(s, chunk)
  pad = n_chunks * size - s
  live = jnp.ones((n, s), bool) if mask is None else mask != 0
  if pad:  # padded positions (target 0) are cut off below
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    live = jnp.pad(live, ((0, 0), (0, pad)))
  # Chunk-major [C, N, size, ...]: lax.map walks the leading axis.
  split = lambda x: jnp.moveaxis(x.reshape(n, n_chunks, size, *x.shape[2:]), 1, 0)

  def head(h, tgt):
    return _picked_logprobs(head_fn(h), tgt)  # [N, size]

  @jax.checkpoint
  def one(args):
    h, tgt, any_live = args
    if mask is None:
      return head(h, tgt)
    return jax.lax.cond(any_live, head, lambda h, tgt: jnp.zeros(tgt.shape, jnp.float32), h, tgt)

  chunk_live = jnp.any(split(live), axis=(1, 2))  # [C]
  out = jax.lax.map(one, (split(hidden), split(targets), chunk_live))  # [C, N, size]
  return jnp.moveaxis(out, 0, 1).reshape(n, n_chunks * size)[:, :s]


def sequence_logprobs(hidden: jax.Array, head_fn: Callable, tokens: jax.Array,
                      loss_mask: jax.Array, *, chunk: int = 0):
  """Summed log-prob of the masked tokens of each row, and their count: (logp [N], n [N]) f32.

  hidden [N, T, D] final hidden states of `tokens` [N, T]; loss_mask [N, T] is 1 on the tokens
  whose log-prob counts (the response; DESIGN.md alignment). Token t is predicted by the hidden
  state at t-1, so token 0 is never scored (its mask entry is dropped). chunk as in
  `target_logprobs`.
  """
  # The hidden states move one right rather than the targets left, so chunks start on token
  # boundaries and a prompt of a chunk's length leaves its chunk skipped whole; the copy is of
  # [N, T, D], not of logits. Position 0 then holds zeros, which its dropped mask entry ignores.
  hidden = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
  mask = jnp.asarray(loss_mask, jnp.float32).at[:, 0].set(0.0)
  logp = target_logprobs(hidden, head_fn, tokens, chunk=chunk, mask=mask if chunk > 0 else None)
  return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def vocab_logprobs(hidden: jax.Array, head_fn: Callable, ids: jax.Array | None = None):
  """log softmax(head_fn(hidden)) at `ids` [J] for every row: [..., D] -> f32 [..., J]; the
  whole vocabulary [..., V] when ids is None. The sampler's next-token scores: one position per
  prompt, whose full distribution (top_logprobs) is V floats a row, so nothing is chunked."""
  logp = log_softmax(head_fn(hidden))
  return logp if ids is None else jnp.take(logp, jnp.asarray(ids, jnp.int32), axis=-1)
