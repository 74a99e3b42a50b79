"""The one log-prob path (`model/logprobs.py`) against the whole-logits computation each caller
made before it, on the same arrays: a full log-softmax over the vocabulary, then the target
taken, in plain jnp. Values to 1e-6 and gradients (jax.grad through both) for the preference
losses' response log-probs, PPO's per-token log-probs, the MC scorer's choice sums and the
sampler's next-token scores, chunked and whole."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import mc_scoring
from stable_alignment_jax.sampling import generate
from stable_alignment_jax.training import ppo, train
from stable_alignment_jax.model import llama, logprobs
from stable_alignment_jax.model.presets import preset

V = 300


@pytest.fixture(scope="module")
def model():
  cfg = preset("tiny", vocab_size=V, dtype="float32", remat="none", max_seq_len=64)
  return nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))


def whole_logprobs(logits, targets):
  """The reference: log_softmax over the whole vocabulary, then take the target."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def assert_trees_close(got, want, rtol, atol):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_target_logprobs_equal_whole_log_softmax_with_a_softcapped_head():
  """The core on a plain matrix head, soft-capped as Gemma's: the values, and both gradients of
  a weighted sum of them, whole and in chunks (4 and 64 leave a ragged end / one chunk)."""
  rng = np.random.default_rng(0)
  n, s, d = 3, 21, 8
  hidden = jnp.asarray(rng.normal(size=(n, s, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (n, s)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(n, s)), jnp.float32)

  def head(h, w):
    return 3.0 * jnp.tanh(jnp.einsum("...d,dv->...v", h, w) / 3.0)

  def new(h, w, chunk):
    return jnp.sum(weights * logprobs.target_logprobs(h, lambda x: head(x, w), targets,
                                                      chunk=chunk))

  old = lambda h, w: jnp.sum(weights * whole_logprobs(head(h, w), targets))
  want_g = jax.grad(old, (0, 1))(hidden, w)
  for chunk in (0, 4, 21, 64):
    got = logprobs.target_logprobs(hidden, lambda x: head(x, w), targets, chunk=chunk)
    np.testing.assert_allclose(got, whole_logprobs(head(hidden, w), targets), rtol=1e-6,
                               atol=1e-6)
    assert_trees_close(jax.grad(new, (0, 1))(hidden, w, chunk), want_g, rtol=1e-5, atol=1e-6)


def test_preference_response_logprobs_equal_whole_log_softmax(model):
  """`train.response_logprobs` (policy and reference both take it) against the whole logits of
  the same model: summed response log-probs, counts, and d/d params."""
  graphdef, params = model
  rng = np.random.default_rng(1)
  b, k, t = 2, 3, 20
  tokens = rng.integers(0, V, (b, k, t)).astype(np.int32)
  mask = np.zeros((b, k, t), np.float32)
  for i in range(b):
    for j in range(k):
      start = int(rng.integers(1, 8))
      mask[i, j, start:int(rng.integers(start + 1, t + 1))] = 1.0
  batch = {"tokens": tokens, "loss_mask": mask}
  scale = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)

  def old(p):
    flat = jnp.asarray(tokens.reshape(b * k, t))
    logits, _ = nnx.merge(graphdef, p)(flat)
    tok_logp = whole_logprobs(logits[:, :-1], flat[:, 1:])
    logp = jnp.sum(tok_logp * mask.reshape(b * k, t)[:, 1:], axis=-1).reshape(b, k)
    return jnp.sum(scale * logp), logp

  def new(p, chunk):
    logp, n = train.response_logprobs(graphdef, p, batch, logprob_chunk=chunk)
    return jnp.sum(scale * logp), (logp, n)

  (_, want), want_g = jax.jit(jax.value_and_grad(old, has_aux=True))(params)
  for chunk in (0, 8):  # 20 positions in chunks of 8: 3 chunks of 7, the last one padded
    (_, (got, n)), g = jax.jit(jax.value_and_grad(functools.partial(new, chunk=chunk),
                                                  has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(n, mask[..., 1:].sum(-1))
    assert_trees_close(g, want_g, rtol=1e-5, atol=1e-6)


def test_ppo_token_logprobs_equal_whole_log_softmax(model):
  """PPO's per-token log-probs (logp, old_logp and ref_logp all come from `ppo.policy_forward` /
  `ppo.token_logprobs`) and their gradient."""
  graphdef, policy = model
  dim = nnx.merge(graphdef, policy).cfg.dim
  params = {"policy": policy, "value_head": {"w": jnp.linspace(-1.0, 1.0, dim),
                                             "b": jnp.zeros(())}}
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, V, (4, 14)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(4, 13)), jnp.float32)

  def old(p):
    logits, _ = nnx.merge(graphdef, p["policy"])(tokens)
    logp = whole_logprobs(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(weights * logp), logp

  def new(p, chunk):
    logp, _ = ppo.policy_forward(graphdef, p, tokens, chunk)
    return jnp.sum(weights * logp), logp

  (_, want), want_g = jax.jit(jax.value_and_grad(old, has_aux=True))(params)
  for chunk in (0, 5):  # 13 positions in chunks of 5: a ragged end
    (_, got), g = jax.jit(jax.value_and_grad(functools.partial(new, chunk=chunk),
                                             has_aux=True))(params)
    assert got.shape == (4, 13)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert_trees_close(g["policy"], want_g["policy"], rtol=1e-5, atol=1e-6)


def test_mc_scorer_sums_equal_whole_log_softmax(model):
  """The MC scorer's choice sums (`_rows_logprob`): right-padded rows, each scoring `length`
  tokens from `start`, against the whole logits of the same padded forward."""
  graphdef, state = model
  rows = [(12, 3), (30, 11), (7, 1), (19, 18)]  # (row length, choice tokens)
  rng = np.random.default_rng(3)
  tokens = np.full((4, 32), -1, np.int32)
  start, length = np.zeros(4, np.int32), np.zeros(4, np.int32)
  for r, (n, k) in enumerate(rows):
    tokens[r, :n] = rng.integers(0, V, n)
    start[r], length[r] = n - k, k
  valid = tokens >= 0
  logits, _ = nnx.merge(graphdef, state)(jnp.asarray(np.where(valid, tokens, 0)),
                                         key_mask=jnp.asarray(valid))
  tok_logp = np.asarray(whole_logprobs(logits[:, :-1], jnp.asarray(np.maximum(tokens, 0))[:, 1:]))
  want = [tok_logp[r, s - 1:s - 1 + k].sum() for r, (s, k) in enumerate(zip(start, length))]
  for chunk in (0, 3):  # k_max 32 in chunks of 3: 11 chunks, the last one padded
    got, n = mc_scoring._rows_logprob(graphdef, state, tokens, start, length, k_max=32,
                                      chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(n, length)


def test_sampler_next_token_scores_equal_whole_log_softmax(model):
  """The sampler's next-token scores (`generate._next_logprobs`) at chosen ids and over the whole
  vocabulary (what serving's top_logprobs reads), against the old whole log-softmax on the same
  left-padded arrays; and the same numbers `target_logprobs` gives a row's next token."""
  graphdef, state = model
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, V, n).tolist() for n in (5, 9, 2)]
  tokens = np.zeros((4, 16), np.int32)
  mask = np.zeros((4, 16), bool)
  for i, p in enumerate(prompts):
    tokens[i, 16 - len(p):], mask[i, 16 - len(p):] = p, True
  mask[3, -1] = True
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  m = nnx.merge(graphdef, state)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  h, _ = m.hidden(tokens, positions=positions, key_mask=mask)
  full = jax.nn.log_softmax(m.logits(h[:, -1]), axis=-1)  # the old body of _next_logprobs
  ids = jnp.asarray([3, 17, 299, 3], jnp.int32)
  np.testing.assert_allclose(generate._next_logprobs(graphdef, state, tokens, mask, ids)[:, 0],
                             full[:, ids], rtol=1e-6, atol=1e-6)
  everything = generate._next_logprobs(graphdef, state, tokens, mask)[:, 0]
  np.testing.assert_allclose(everything, full, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logprobs.vocab_logprobs(h[:, -1], m.logits), full, rtol=1e-6,
                             atol=1e-6)
  # One path: the per-target form scores the same next token identically.
  target = jnp.asarray([[17], [3], [299], [0]], jnp.int32)
  per_target = logprobs.target_logprobs(h[:, -1:], m.logits, target)[:, 0]
  np.testing.assert_array_equal(per_target, jnp.take_along_axis(everything, target, -1)[:, 0])


def test_continuation_logprobs_in_one_forward_equal_the_prefixes_next_token_scores(model):
  """What serving's logprobs read: the J next-token distributions of a reply from one forward
  over prompt + reply, against `next_token_logprobs` of the J prefixes (J forwards' worth, the
  way serving computed them before), and the whole log-softmax of each unpadded prefix."""
  graphdef, state = model
  sampler = generate.Sampler(graphdef, state, eos_id=0)
  rng = np.random.default_rng(5)
  prompt, reply = rng.integers(1, V, 6).tolist(), rng.integers(1, V, 5).tolist()
  got = sampler.continuation_logprobs(prompt, reply)
  assert got.shape == (5, V)
  prefixes = [prompt + reply[:j] for j in range(5)]
  np.testing.assert_allclose(got, sampler.next_token_logprobs(prefixes, list(range(V))),
                             rtol=1e-5, atol=1e-5)
  m = nnx.merge(graphdef, state)
  for j, row in enumerate(prefixes):
    logits, _ = m(jnp.asarray([row]))
    np.testing.assert_allclose(got[j], jax.nn.log_softmax(logits[0, -1]), rtol=1e-5, atol=1e-5)
  assert sampler.continuation_logprobs(prompt, []).shape == (0, V)
