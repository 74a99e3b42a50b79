"""The prompt once per example: packed rows [prompt | K response tails] give every response the
hidden states, log-probs and gradients of its own unpacked row; a batch that does not share the
prefix falls back to the unpacked forward; the loader reports the prefix every batch shares."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from stable_alignment_jax.data import loader as data
from stable_alignment_jax.training import optim, train, train_log
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset
from stable_alignment_jax.data.tokenizer import load_tokenizer

B, K, T, P = 2, 3, 24, 9


def _model(scan_layers, remat="dots", **family):
  # GQA (4 query heads on 2 kv heads), so the prefix keys are shared across query groups too
  cfg = dataclasses.replace(preset("tiny", dtype="float32", vocab_size=61), n_heads=4,
                            n_kv_heads=2, scan_layers=scan_layers, remat=remat, **family)
  return nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(3)), nnx.Param)


def _batch(seed=0, prefix=P):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 61, (B, K, T)).astype(np.int32)
  tokens[:, :, :prefix] = tokens[:, :1, :prefix]
  loss_mask = np.zeros((B, K, T), np.float32)
  loss_mask[:, :, P:T - 2] = 1.0
  loss_mask[1, 2, P + 3:] = 0.0  # a shorter response
  return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask),
          "ratings": jnp.asarray(rng.normal(size=(B, K)), jnp.float32),
          "response_mask": jnp.ones((B, K), jnp.float32)}


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, params, tokens, positions=None):
  segments = None if positions is None else (P, K)
  return nnx.merge(graphdef, params).hidden(tokens, positions=positions, segments=segments)[0]


def _packed(x):
  """[B, K, T] rows packed by hand: the prompt once, then each response's tail at its own
  positions."""
  rows = np.concatenate([x[:, 0, :P], x[:, :, P:].reshape(B, -1)], axis=1)
  pos = np.concatenate([np.arange(P), np.tile(np.arange(P, T), K)])
  return rows, np.broadcast_to(pos, rows.shape)


# Gemma-like: a local layer whose window (5) reaches back across the prompt/response boundary
# (P = 9) for the first responses' tokens only, and a global one; soft-capped scores.
WINDOWED = dict(sliding_window=5, layer_types=("sliding", "full"), attn_softcap=3.0,
                qk_norm=True, norm_offset=1.0, post_norms=True)


@pytest.mark.parametrize("scan_layers, family", [(True, {}), (False, {}), (True, WINDOWED),
                                                 (False, WINDOWED)])
def test_each_segment_of_a_packed_row_has_its_own_rows_hidden_states(scan_layers, family):
  graphdef, params = _model(scan_layers, **family)
  x = np.asarray(_batch()["tokens"])
  want = np.asarray(_hidden(graphdef, params, x.reshape(B * K, T))).reshape(B, K, T, -1)
  got = np.asarray(_hidden(graphdef, params, *_packed(x)))
  for k in range(K):
    np.testing.assert_allclose(got[:, :P], want[:, k, :P], atol=2e-5)
    np.testing.assert_allclose(got[:, P + k * (T - P):P + (k + 1) * (T - P)], want[:, k, P:],
                               atol=2e-5)


def test_segments_that_do_not_fit_the_row_are_refused():
  graphdef, params = _model(True)
  model = nnx.merge(graphdef, params)
  with pytest.raises(ValueError, match="segments"):
    model.hidden(jnp.zeros((1, 10), jnp.int32), segments=(3, 2))  # 7 tokens in 2 segments


@pytest.mark.parametrize("scan_layers,chunk", [(True, 8), (False, 0)])
def test_shared_prefix_log_probs_and_gradients_equal_the_unpacked_rows(scan_layers, chunk):
  graphdef, params = _model(scan_layers)
  batch = _batch()

  def total(p, prefix):
    logp, n = train.response_logprobs(graphdef, p, batch, logprob_chunk=chunk,
                                      shared_prefix=prefix)
    return jnp.sum(logp * jnp.arange(1.0, 1 + B * K).reshape(B, K)), (logp, n)

  grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
  (_, (want, n_want)), g_want = grad(params, 0)
  for prefix in ((1, P) if scan_layers else (P,)):  # a one-token prompt too
    (_, (got, n_got)), g_got = grad(params, prefix)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(n_got, n_want)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_a_batch_that_does_not_share_the_prefix_takes_the_unpacked_forward():
  graphdef, params = _model(True)
  batch = _batch(prefix=4)  # example rows differ from position 4 on; the step is told 9
  want = train.response_logprobs(graphdef, params, batch, shared_prefix=0)[0]
  got = train.response_logprobs(graphdef, params, batch, shared_prefix=P)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The guard matters: packing this batch anyway gives the other rows row 0's prompt.
  x = np.asarray(batch["tokens"])
  packed = np.asarray(_hidden(graphdef, params, *_packed(x)))
  unpacked = np.asarray(_hidden(graphdef, params, x.reshape(B * K, T))).reshape(B, K, T, -1)
  assert np.abs(packed[:, P + (T - P):P + 2 * (T - P)] - unpacked[:, 1, P:]).max() > 1e-3


def test_empty_slots_need_not_share_the_prefix():
  graphdef, params = _model(True)
  batch = _batch()
  tokens = np.asarray(batch["tokens"]).copy()
  tokens[0, 2, :] = 0  # an empty slot of zeros (our loader fills them with the prompt)
  mask = np.asarray(batch["loss_mask"]).copy()
  mask[0, 2] = 0.0
  rm = np.ones((B, K), np.float32)
  rm[0, 2] = 0.0
  batch = dict(batch, tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask),
               response_mask=jnp.asarray(rm))
  want = np.asarray(train.response_logprobs(graphdef, params, batch, shared_prefix=0)[0])
  got = np.asarray(train.response_logprobs(graphdef, params, batch, shared_prefix=P)[0])
  valid = rm > 0
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5)
  assert bool(train.shares_prefix(batch, P))  # so the packed forward is the one that ran
  assert not bool(train.shares_prefix(dict(batch, response_mask=jnp.ones((B, K))), P))
  assert not bool(train.shares_prefix(_batch(prefix=4), P))


def test_train_step_with_a_shared_prefix_takes_the_same_step():
  graphdef, params = _model(True)
  c = base.get_config()
  tx = optim.make_optimizer(c.optim, 10)[0]
  batch = _batch()
  out = {}
  for prefix in (0, P):
    step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                                     table=train.loss_table(c.loss, []), accum_steps=2,
                                     logprob_chunk=8, shared_prefix=prefix))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    out[prefix] = step(state, batch)
  np.testing.assert_allclose(out[P][1]["loss"], out[0][1]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[P][0]["params"]), jax.tree.leaves(out[0][0]["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_shared_prefix_setting():
  assert train.shared_prefix_for(-1, 37, 128)[0] == 37
  assert train.shared_prefix_for(-1, 200, 128)[0] == 127  # never the whole row
  assert train.shared_prefix_for(0, 37, 128)[0] == 0
  assert train.shared_prefix_for(12, 37, 128)[0] == 12
  for bad in (-2, 128):
    with pytest.raises(ValueError, match="train.shared_prefix"):
      train.shared_prefix_for(bad, 37, 128)


def test_the_loader_reports_the_prefix_every_batch_shares():
  byte = load_tokenizer("byte")
  examples = [{"prompt": "q" * (5 + 3 * i), "responses": [f"answer {i}", "no", "maybe not"],
               "ratings": [1.0, 2.0, 0.0]} for i in range(6)]
  examples.append({"prompt": "x" * 40, "responses": ["a"], "ratings": [1.0]})  # one response
  loader = data.make_loader(examples, byte, global_batch_size=7, max_len=32, num_responses=3,
                            seed=0, shard_index=0, shard_count=1, prompt_format="alpaca")
  fmt = data.as_format(byte, "alpaca")
  kept = [ex for ex in examples if data.drop_reason(ex, byte, max_len=32,
                                                    prompt_format="alpaca") is None]
  assert len(kept) == 6  # the 40-character prompt does not fit
  shortest = min(len(fmt.prompt_ids(ex)) for ex in kept)
  assert loader.stats["min_prompt_len"] == shortest
  batch = next(iter(loader))
  head = batch["tokens"][:, :, :shortest]
  assert (head == head[:, :1]).all()


def test_logger_counts_the_packed_positions_for_mfu(tmp_path):
  cfg = preset("tiny", dtype="float32")
  mesh = jax.make_mesh((1,), ("data",))
  batch = {k: np.asarray(v) for k, v in _batch().items()}
  mfu = {}
  for prefix in (0, P):
    log = train_log.Logger(str(tmp_path), cfg, mesh, tensorboard=False,
                           peak_flops_per_device=1e12, shared_prefix=prefix)
    metrics = {}
    log.train(1, metrics, batch, 1.0)
    mfu[prefix] = metrics["mfu"]
  tokens_packed, tokens_all = B * (P + K * (T - P)), B * K * T
  np.testing.assert_allclose(mfu[P] / mfu[0], tokens_packed / tokens_all, rtol=1e-6)
