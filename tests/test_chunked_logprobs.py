"""Per-response log-probs from the hidden states in chunks of positions: the same values and
gradients as the whole logits, a compiled step whose temporaries shrink with the chunk, the MC
scorer's chunked path, and the trainer's count of real (unpadded) tokens."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import mc_scoring
from stable_alignment_jax.training import train, train_log
from stable_alignment_jax.model import llama, logprobs
from stable_alignment_jax.model.presets import preset


def _problem(n=5, t=37, d=16, v=97, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)
  mask = (rng.random((n, t)) < 0.6).astype(np.float32)
  mask[0] = 0.0  # a row with nothing to score
  mask[1, :] = 1.0  # a row scored everywhere, the last position included (it predicts nothing)
  return hidden, w, tokens, jnp.asarray(mask)


def _numpy_logprobs(hidden, w, tokens, mask):
  """Independent reference in float64: log-softmax of each position, target = next token."""
  logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  tok, m = np.asarray(tokens), np.asarray(mask)
  n, t = tok.shape
  out, cnt = np.zeros(n), np.zeros(n)
  for i in range(n):
    for p in range(t - 1):
      if m[i, p + 1]:
        out[i] += logits[i, p, tok[i, p + 1]] - logz[i, p]
        cnt[i] += 1
  return out, cnt


@pytest.mark.parametrize("chunk", [1, 8, 36, 64])  # 37 positions: 8 and 36 leave a ragged end
def test_chunked_values_equal_whole_logits(chunk):
  hidden, w, tokens, mask = _problem()
  head = lambda h: jnp.einsum("...d,dv->...v", h, w)
  logp, n = logprobs.sequence_logprobs(hidden, head, tokens, mask, chunk=chunk)
  ref_logp, ref_n = logprobs.sequence_logprobs(hidden, head, tokens, mask)
  np_logp, np_n = _numpy_logprobs(hidden, w, tokens, mask)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logp, np_logp, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(n, ref_n)
  np.testing.assert_array_equal(n, np_n)
  assert float(logp[0]) == 0.0 and float(n[1]) == 36


@pytest.mark.parametrize("chunk", [1, 8, 37])
def test_per_token_chunked_log_probs_equal_numpy_and_their_gradient(chunk):
  """PPO's per-token form: every position's log-prob, and the gradient of a weighted sum of
  them, as the whole logits give."""
  hidden, w, tokens, _ = _problem()
  head = lambda h: jnp.einsum("...d,dv->...v", h, w)
  targets = jnp.roll(tokens, -1, axis=1)
  got = logprobs.target_logprobs(hidden, head, targets, chunk=chunk)
  logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - logz
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  whole = lambda h, w_: jnp.sum(weights * jnp.take_along_axis(
      jax.nn.log_softmax(jnp.einsum("...d,dv->...v", h, w_)), targets[..., None], -1)[..., 0])
  chunked = lambda h, w_: jnp.sum(weights * logprobs.target_logprobs(
      h, lambda x: jnp.einsum("...d,dv->...v", x, w_), targets, chunk=chunk))
  for a, b in zip(jax.grad(chunked, (0, 1))(hidden, w), jax.grad(whole, (0, 1))(hidden, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunks_without_a_loss_token_skip_the_head():
  """Chunks start on token boundaries: with a 16-token prompt and chunks of 16, the first chunk
  holds no loss token in any row and the head never runs on it (NaN hidden states there reach
  neither the values nor the gradients), and so does a chunk that is padding in every row."""
  hidden, w, tokens, _ = _problem(n=3, t=64, seed=1)
  mask = np.zeros((3, 64), np.float32)
  mask[:, 16:40] = 1.0  # the prompt is tokens 0-15, padding 40-63: chunks 0 and 3 skip
  mask[2, 33:] = 0.0
  mask = jnp.asarray(mask)
  head = lambda h: jnp.einsum("...d,dv->...v", h, w)
  np_logp, _ = _numpy_logprobs(hidden, w, tokens, mask)
  # hidden state p predicts token p + 1: states 0-14 fall in chunk 0, 47-62 in chunk 3
  poisoned = hidden.at[:, :15].set(jnp.nan).at[:, 47:].set(jnp.nan)

  def total(h):
    return jnp.sum(logprobs.sequence_logprobs(h, head, tokens, mask, chunk=16)[0])

  logp, _ = logprobs.sequence_logprobs(poisoned, head, tokens, mask, chunk=16)
  np.testing.assert_allclose(logp, np_logp, rtol=1e-5, atol=1e-4)
  grad = jax.grad(total)(poisoned)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, jax.grad(total)(hidden), atol=1e-6)
  # The unchunked path has no skip: the poison shows, so this test can fail.
  assert not np.all(np.isfinite(logprobs.sequence_logprobs(poisoned, head, tokens, mask,
                                                           chunk=64)[0]))


def test_chunk_plan_is_even_and_covers_every_position():
  assert logprobs.chunk_plan(360, 64) == (6, 60)
  assert logprobs.chunk_plan(37, 8) == (5, 8)
  assert logprobs.chunk_plan(37, 100) == (1, 37)
  for t in range(1, 70):
    for c in (1, 5, 16, 64):
      k, size = logprobs.chunk_plan(t, c)
      assert size <= c and k * size >= t > (k - 1) * size and k * size - t < k


def test_chunked_gradients_equal_whole_logits():
  hidden, w, tokens, mask = _problem()
  weights = jnp.linspace(-1.0, 2.0, hidden.shape[0])  # each row's log-prob weighted differently

  def objective(chunk, hidden, w):
    head = lambda h: jnp.einsum("...d,dv->...v", h, w)
    if chunk:
      logp, _ = logprobs.sequence_logprobs(hidden, head, tokens, mask, chunk=chunk)
    else:
      logp, _ = logprobs.sequence_logprobs(hidden, head, tokens, mask)
    return jnp.sum(logp * weights)

  g_ref = jax.grad(functools.partial(objective, 0), argnums=(0, 1))(hidden, w)
  g = jax.grad(functools.partial(objective, 8), argnums=(0, 1))(hidden, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g[0][0]).max()) == 0.0  # the unscored row gets no gradient


def _tiny(**kw):
  return preset("tiny", dtype="float32", remat="none", max_seq_len=256, **kw)


def _batch(b, k, t, vocab, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, k, t), np.float32)
  for i in range(b):
    for j in range(k):
      start = rng.integers(1, t // 2)
      mask[i, j, start:rng.integers(start + 1, t + 1)] = 1.0
  return {"tokens": rng.integers(0, vocab, (b, k, t)).astype(np.int32), "loss_mask": mask}


def test_response_logprobs_chunked_equals_unchunked_with_a_tied_head():
  # Tied: the embedding gets gradient both through the lookup and through the chunked head.
  cfg = _tiny(vocab_size=256, tie_embeddings=True)
  graphdef, params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  batch = _batch(2, 3, 45, cfg.vocab_size)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(chunk, params):
    def f(p):
      logp, n = train.response_logprobs(graphdef, p, batch, logprob_chunk=chunk)
      return jnp.sum(logp / n), (logp, n)
    return jax.value_and_grad(f, has_aux=True)(params)

  (_, (logp0, n0)), g0 = value_and_grad(0, params)
  (_, (logp1, n1)), g1 = value_and_grad(16, params)  # 45 positions: 3 chunks of 15
  np.testing.assert_allclose(logp1, logp0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(n1, n0)
  np.testing.assert_array_equal(n0, batch["loss_mask"][..., 1:].sum(-1))
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1) > 0
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_temp_bytes_fall_with_the_chunk():
  """vocab 32768, dim 64, 2 layers, N=8 rows of T=128: whole f32 logits L = N*T*V*4 = 128 MiB.

  Unchunked, the step must hold the logits and their gradient at once: temp >= 2 L. Chunked by
  16 positions, one chunk's logits are L / 8 and nothing the size of the whole logits may exist:
  temp < 0.75 L. XLA:CPU keeps about 3 logits-sized buffers (logits, exp, gradient) over a ~0.2 L
  rest, so the expected ratio is (0.2 + 3) / (0.2 + 3/8) ~ 5.5; we require more than 4."""
  n, t, v = 8, 128, 32768
  cfg = _tiny(vocab_size=v, dim=64, n_layers=2)
  graphdef, params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  batch = _batch(n, 1, t, v)

  def step(params, batch, chunk):
    def f(p):
      logp, n_tok = train.response_logprobs(graphdef, p, batch, logprob_chunk=chunk)
      return -jnp.sum(logp) / jnp.sum(n_tok)
    return jax.value_and_grad(f)(params)

  temp = {c: jax.jit(functools.partial(step, chunk=c)).lower(params, batch).compile()
          .memory_analysis().temp_size_in_bytes for c in (0, 16)}
  whole = n * t * v * 4
  assert temp[0] >= 2 * whole, temp
  assert temp[16] < 0.75 * whole, temp
  assert temp[0] / temp[16] > 4, temp


def test_mc_scorer_chunked_equals_unchunked():
  cfg = _tiny(vocab_size=300)
  graphdef, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(2)
  rows = [(rng.integers(0, 300, size=int(L)).tolist(), int(k))
          for L, k in [(12, 3), (30, 11), (7, 1), (19, 19 - 1), (25, 5)]]
  out = {}
  for chunk in (0, 3):  # k_max 32 (and 8) in chunks of 3: 11 (3) chunks, the last one padded
    scorer = mc_scoring.LogLikelihoodScorer(graphdef, state, None, batch_size=4, bucket=8,
                                            progress=False, logprob_chunk=chunk)
    out[chunk] = scorer.score_rows(rows)
  np.testing.assert_allclose(out[3][0], out[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[3][1], [k for _, k in rows])
  # Independent figure: the whole logits of each row, one at a time.
  model = nnx.merge(graphdef, state)
  for (ids, k), got in zip(rows, out[3][0]):
    logits, _ = model(jnp.asarray([ids]))
    logp = jax.nn.log_softmax(logits[0], -1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - k, len(ids)))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def _handmade_batch():
  """B=2 prompts, K=2, T=6. Row lengths (prompt + response): 5, 3, 6 and an empty slot."""
  loss_mask = np.zeros((2, 2, 6), np.float32)
  loss_mask[0, 0, 2:5] = 1  # prompt 2 + response 3 -> 5 real tokens, 1 pad
  loss_mask[0, 1, 2:3] = 1  # prompt 2 + response 1 -> 3 real, 3 pad
  loss_mask[1, 0, 1:6] = 1  # prompt 1 + response 5 -> 6 real, no pad
  # [1, 1]: an empty response slot (prompt repeated, fully masked) -> 0 real
  return {"tokens": np.zeros((2, 2, 6), np.int32), "loss_mask": loss_mask,
          "response_mask": np.array([[1, 1], [1, 0]], np.float32)}


def test_real_tokens_of_a_handmade_batch():
  assert train_log.real_tokens(_handmade_batch()) == 5 + 3 + 6


def test_logger_reports_real_tokens_per_s_and_padding_share(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  logger = train_log.Logger(str(tmp_path), _tiny(), mesh, tensorboard=False,
                            peak_flops_per_device=1e12)
  metrics = {"loss": 1.0}
  logger.train(3, metrics, _handmade_batch(), seconds=2.0)
  logger.close()
  assert metrics["tokens_per_s"] == pytest.approx(24 / 2.0)
  assert metrics["real_tokens_per_s"] == pytest.approx(14 / 2.0)
  assert metrics["padding_share"] == pytest.approx(10 / 24)
  rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert rec["step"] == 3 and rec["real_tokens_per_s"] == pytest.approx(7.0)
