"""The LLaMA model against an independent numpy forward, and its config knobs.

The reference below is written from the LLaMA formulas (RMSNorm, rotate-half RoPE, grouped-query
attention by repeating KV heads, causal softmax, SwiGLU, untied head) and the other families'
(Qwen2's q/k/v biases, per-head q/k norms, Gemma's (1 + w) norms, post-norms, GeGLU, sqrt(dim)
embeddings, query_pre_attn_scalar, soft-caps, sliding-window layers with their own RoPE base), in
float64, reading our `Llama`'s weights from `nnx.state`. It is the spec: if it disagrees with the model, the model is
wrong. Do not "fix" the reference to match the model.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stable_alignment_jax.model.llama import Llama
from stable_alignment_jax.model.presets import ModelConfig, preset


# ---------------------------------------------------------------- numpy reference (do not "fix")

def _np_params(model) -> dict:
  """Our model's weights as a nested dict of float64 numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model)))


def _rmsnorm(x, scale, eps, offset=0.0):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + scale)


def _frequencies(cfg, e):
  """RoPE inverse frequencies, float64, with the scaling of transformers' rope_type."""
  freqs = cfg.rope_theta ** (-np.arange(0, e // 2) * 2.0 / e)  # [E/2]
  if cfg.rope_type == "linear":
    return freqs / cfg.rope_factor
  if cfg.rope_type == "llama3":
    out = []
    for f in freqs:  # one frequency at a time, as the LLaMA-3.1 release describes it
      wavelen = 2 * np.pi / f
      if wavelen < cfg.rope_original_max_len / cfg.rope_high_freq_factor:
        out.append(f)  # short wavelengths: unchanged
      elif wavelen > cfg.rope_original_max_len / cfg.rope_low_freq_factor:
        out.append(f / cfg.rope_factor)  # long wavelengths: scaled down fully
      else:
        smooth = ((cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        out.append((1 - smooth) * f / cfg.rope_factor + smooth * f)
    return np.asarray(out)
  return freqs


def _rope(x, cfg, local_theta=0.0):
  """x: [T, N, E] at positions 0..T-1; pairs dimension i with i + E/2 (rotate-half). A sliding
  layer with its own base (Gemma 3) uses plain frequencies of that base."""
  t, _, e = x.shape
  freqs = local_theta ** (-np.arange(0, e // 2) * 2.0 / e) if local_theta else _frequencies(cfg, e)
  ang = np.arange(t)[:, None] * freqs[None, :]  # [T, E/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  a, b = x[..., : e // 2], x[..., e // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _cap(x, cap):
  return cap * np.tanh(x / cap) if cap else x


def reference_logits(params: dict, cfg: ModelConfig, tokens) -> np.ndarray:
  """Logits [T, V] of one unpadded sequence, computed head by head."""
  h_, k_, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  group = h_ // k_  # query heads per kv head: head j reads kv head j // group
  norm = lambda x, p: _rmsnorm(x, p["scale"], cfg.norm_eps, cfg.norm_offset)
  x = params["embed"][np.asarray(tokens)]  # [T, D]
  if cfg.embed_scale:
    x = x * np.sqrt(cfg.dim)
  t = x.shape[0]
  qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
  for i in range(cfg.n_layers):
    if cfg.scan_layers:  # stacked weights: layer i is index i of every leaf
      lp = jax.tree.map(lambda w: w[i], params["layers"])
    else:
      lp = params["layers"][i]
    sliding = bool(cfg.layer_types) and cfg.layer_types[i] == "sliding"
    hidden = (ki > qi) | (sliding & (qi - ki >= cfg.sliding_window))  # future, or out of window
    a = lp["attn"]
    hn = norm(x, lp["attn_norm"])
    q = np.einsum("td,dhe->the", hn, a["wq"])
    k = np.einsum("td,dke->tke", hn, a["wk"])
    v = np.einsum("td,dke->tke", hn, a["wv"])
    if cfg.qkv_bias:
      q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
    if cfg.qk_norm:
      q, k = norm(q, a["q_norm"]), norm(k, a["k_norm"])
    local = cfg.rope_local_theta if sliding else 0.0
    q, k = _rope(q, cfg, local), _rope(k, cfg, local)
    k = np.repeat(k, group, axis=1)  # [T, H, E]
    v = np.repeat(v, group, axis=1)
    heads = []
    for j in range(h_):
      s = _cap(q[:, j] @ k[:, j].T / np.sqrt(cfg.query_pre_attn_scalar or e), cfg.attn_softcap)
      s = np.where(hidden, -np.inf, s)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      heads.append(p @ v[:, j])
    attn = np.einsum("the,hed->td", np.stack(heads, axis=1), a["wo"])
    x = x + (norm(attn, lp["attn_post_norm"]) if cfg.post_norms else attn)
    m = lp["mlp"]
    hn = norm(x, lp["mlp_norm"])
    act = _gelu_tanh if cfg.mlp_act == "gelu_tanh" else _silu
    out = (act(hn @ m["w_gate"]) * (hn @ m["w_up"])) @ m["w_down"]
    x = x + (norm(out, lp["mlp_post_norm"]) if cfg.post_norms else out)
  x = norm(x, params["final_norm"])
  return _cap(x @ (params["embed"].T if cfg.tie_embeddings else params["lm_head"]),
              cfg.final_softcap)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cfg():
  return preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def model(cfg):
  return Llama(cfg, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, key_mask):
  return nnx.merge(graphdef, state)(tokens, key_mask=key_mask)[0]


def _forward(model, tokens, key_mask=None):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, jnp.asarray(tokens), key_mask))


def _with_cfg(model, **changes):
  """The same weights under a changed config (the config is static data of the module)."""
  cfg = dataclasses.replace(model.cfg, **changes)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


# ---------------------------------------------------------------- forward parity

def test_forward_matches_numpy_reference_on_a_batch(model, cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (3, 24))
  logits = _forward(model, tokens)
  assert logits.shape == (3, 24, cfg.vocab_size) and logits.dtype == np.float32
  params = _np_params(model)
  for b in range(3):
    ref = reference_logits(params, cfg, tokens[b])
    np.testing.assert_allclose(logits[b], ref, atol=1e-4, rtol=0)
  # The comparison is not vacuous: logits vary across the vocabulary and positions.
  assert logits.std() > 0.1


def test_forward_matches_reference_on_a_long_prompt(model, cfg):
  # Long prompts reach rotary angles where a wrong frequency layout shows; short ones hide it.
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 320))
  logits = _forward(model, tokens)
  ref = reference_logits(_np_params(model), cfg, tokens[0])
  np.testing.assert_allclose(logits[0], ref, atol=1e-4, rtol=0)


def test_right_padding_with_key_mask_keeps_valid_logits(model, cfg):
  rng = np.random.default_rng(2)
  lengths = [7, 19, 12]
  t = 20
  tokens = np.zeros((3, t), np.int32)
  seqs = [rng.integers(1, cfg.vocab_size, n) for n in lengths]
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
    tokens[b, len(s):] = rng.integers(1, cfg.vocab_size, t - len(s))  # junk, must not leak
  key_mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
  padded = _forward(model, tokens, key_mask=jnp.asarray(key_mask))
  for b, s in enumerate(seqs):
    alone = _forward(model, s[None])[0]
    np.testing.assert_allclose(padded[b, :len(s)], alone, atol=1e-5, rtol=0)


def test_rope_theta_is_live(model, cfg):
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 64))
  base = _forward(model, tokens)[0]
  other = _with_cfg(model, rope_theta=500000.0)
  changed = _forward(other, tokens)[0]
  # Position 0 has no rotation, so only later positions may differ.
  np.testing.assert_allclose(changed[0], base[0], atol=1e-5)
  assert np.abs(changed[1:] - base[1:]).max() > 1e-2
  ref = reference_logits(_np_params(model), other.cfg, tokens[0])
  np.testing.assert_allclose(changed, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- today's LLaMA variants

_GEMMA = dict(norm_offset=1.0, post_norms=True, mlp_act="gelu_tanh", embed_scale=True,
              query_pre_attn_scalar=24.0, head_dim=32, sliding_window=16, tie_embeddings=True)
VARIANTS = {
    "tied": dict(tie_embeddings=True),
    "head_dim": dict(head_dim=32),  # 4 heads x 32 != dim 64, as LLaMA-3.2-3B / Mistral-Nemo
    "llama3_rope": dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=32,
                        rope_theta=500000.0),
    "linear_rope": dict(rope_type="linear", rope_factor=4.0),
    "unrolled": dict(scan_layers=False),
    # The other families, as config fields; windows of 16 under 96 positions.
    "qwen2": dict(qkv_bias=True, rope_theta=1e6, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=32, rope_theta=1e6),
    "mistral_window": dict(sliding_window=16, layer_types=("sliding", "sliding")),
    "gemma2": dict(_GEMMA, attn_softcap=5.0, final_softcap=10.0, layer_types=("sliding", "full")),
    "gemma3": dict(_GEMMA, qk_norm=True, layer_types=("full", "sliding"), rope_theta=1e6,
                   rope_local_theta=10000.0, rope_type="linear", rope_factor=8.0),
    "gemma3_unrolled": dict(_GEMMA, qk_norm=True, layer_types=("full", "sliding"),
                            rope_local_theta=10000.0, scan_layers=False),
}


def _perturbed(model, seed=0):
  """The model with its norm weights and biases moved off their init (ones / zeros), so a
  norm offset or a bias the forward ignores shows."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  pure = jax.tree.map_with_path(
      lambda path, x: x + 0.3 * rng.normal(size=x.shape).astype(x.dtype)
      if any(str(getattr(p, "key", "")) in ("scale", "bq", "bk", "bv") for p in path) else x,
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_numpy_reference(name):
  cfg = preset("tiny", dtype="float32", **VARIANTS[name])
  model = _perturbed(Llama(cfg, rngs=nnx.Rngs(1)))
  # 96 positions: past the llama3 variant's original context of 32, where scaling matters.
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 96))
  logits = _forward(model, tokens)[0]
  ref = reference_logits(_np_params(model), cfg, tokens[0])
  scale = np.abs(ref).max()
  np.testing.assert_allclose(logits, ref, atol=1e-5 * max(scale, 1.0), rtol=0)
  if cfg.tie_embeddings:
    assert "lm_head" not in nnx.to_pure_dict(nnx.state(model))


def test_rope_scaling_changes_only_long_wavelengths():
  base = preset("tiny", dtype="float32")
  scaled = dataclasses.replace(base, **VARIANTS["llama3_rope"])
  model = Llama(scaled, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(7).integers(0, base.vocab_size, (1, 96))
  plain = _with_cfg(model, rope_type="default")
  a, b = _forward(model, tokens)[0], _forward(plain, tokens)[0]
  assert np.abs(a - b).max() > 1e-2  # the scaling is live
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # position 0 is never rotated


def test_scanned_and_unrolled_layers_hold_the_same_weights_and_logits(model, cfg):
  assert cfg.scan_layers  # the default layout
  unrolled = Llama(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
  stacked, per_layer = _np_params(model)["layers"], _np_params(unrolled)["layers"]
  for i in range(cfg.n_layers):
    jax.tree.map(lambda s, u: np.testing.assert_array_equal(s[i], u),
                 stacked, per_layer[i])
  tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 24))
  np.testing.assert_allclose(_forward(model, tokens), _forward(unrolled, tokens), atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_cache_prefill_then_decode_equals_the_full_forward(cfg, scan):
  from stable_alignment_jax.model import llama
  c = dataclasses.replace(cfg, scan_layers=scan)
  model = Llama(c, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(9).integers(0, c.vocab_size, (2, 12)))
  full = _forward(model, tokens)
  cache = llama.init_cache(c, 2, 16)
  key_mask = jnp.zeros((2, 16), bool).at[:, :8].set(True)
  logits, cache = model(tokens[:, :8], key_mask=key_mask, cache=cache, cache_index=0)
  outs = [logits]
  for i in range(8, 12):
    key_mask = key_mask.at[:, i].set(True)
    step, cache = model(tokens[:, i:i + 1], positions=jnp.full((2, 1), i), key_mask=key_mask,
                        cache=cache, cache_index=jnp.int32(i))
    outs.append(step)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4])
def test_chunked_decode_over_stale_slots_equals_the_full_forward(cfg, window):
  """Chunks of 3 tokens appended at a traced cache_index, over a cache whose unwritten slots hold
  garbage: the step attends over the old slots and its own chunk (causally), never the stale
  ones it is about to overwrite or those after it. With a window of 4 on one layer, that layer
  keeps a ring of 4 + RING_SLACK = 19 slots of the 32: the chunks wrap it."""
  from stable_alignment_jax.model import llama
  c = dataclasses.replace(cfg, scan_layers=False, sliding_window=window,
                          layer_types=("sliding", "full") if window else ())
  model = Llama(c, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(10).integers(0, c.vocab_size, (2, 29)))
  full = _forward(model, tokens)
  cache = jax.tree.map(lambda x: x + 7.0, llama.init_cache(c, 2, 32))
  key_mask = jnp.ones((2, 32), bool)  # every slot "valid": only causality hides the stale ones
  logits, cache = model(tokens[:, :8], key_mask=key_mask, cache=cache, cache_index=0)
  outs = [logits]
  step = jax.jit(lambda cache, tok, i: model(tok, positions=i + jnp.arange(3)[None], cache=cache,
                                             key_mask=key_mask, cache_index=i))
  assert [v.shape[1] for v in cache.v] == ([19, 32] if window else [32, 32])
  for i in range(8, 29, 3):
    logits, cache = step(cache, tokens[:, i:i + 3], jnp.int32(i))
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_bf16_cache_is_read_without_a_widened_copy(cfg):
  """f32 compute over a bf16 cache: both decode dots take the bf16 cache as it lies (the query
  and probabilities are rounded instead), and the new slot is written without widening: no
  cache-sized f32 array exists in the compiled step (XLA's CPU backend otherwise widens a bf16
  dynamic-update-slice, a copy of the cache per step)."""
  from stable_alignment_jax.model import llama
  c = dataclasses.replace(cfg, scan_layers=False, dtype="float32")
  model = Llama(c, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  s = 48  # a slot count no other array here has

  def step(state, cache):
    m = nnx.merge(graphdef, state)
    return m(jnp.zeros((2, 1), jnp.int32), positions=jnp.full((2, 1), 5), cache=cache,
             cache_index=jnp.int32(5))

  hlo = jax.jit(step).lower(state, llama.init_cache(c, 2, s, "bfloat16")).as_text()
  n = 2 * c.n_kv_heads
  kv = f"{n}x{s}x{c.head_dim}"  # a 16-bit cache holds keys and values [B*K,S,E]
  assert f"tensor<{kv}xbf16>) -> tensor<{kv}xf32>" not in hlo  # no widening convert
  dots = [line for line in hlo.splitlines() if "dot_general" in line and kv in line]
  assert len(dots) == 2 * c.n_layers and all(f"{kv}xbf16" in d for d in dots), dots
  compiled = jax.jit(step).lower(state, llama.init_cache(c, 2, s, "bfloat16")).compile()
  assert f"f32[{n},{s},{c.head_dim}]" not in compiled.as_text()
  # The f32 cache keeps f32 dots, over keys stored [B*K,E,S] and values [B*K,S,E]; on CPU the
  # scores and values of a one-token step are one matrix-vector dot each per query head of a
  # kv head.
  hlo32 = jax.jit(step).lower(state, llama.init_cache(c, 2, s)).as_text()
  kt = f"{n}x{c.head_dim}x{s}"
  dots32 = [line for line in hlo32.splitlines() if "dot_general" in line]
  rows = c.n_heads // c.n_kv_heads if jax.default_backend() == "cpu" else 1
  assert sum(f"{kt}xf32" in d for d in dots32) == c.n_layers * rows, dots32
  assert sum(f"{kv}xf32" in d for d in dots32) == c.n_layers * rows, dots32


def test_grow_cache_keeps_the_filled_slots(cfg):
  from stable_alignment_jax.model import llama
  for scan in (True, False):
    c = dataclasses.replace(cfg, scan_layers=scan)
    # f32 keys hold their slots on the last axis ([B*K,E,S]), values (and 16-bit keys) on the
    # one before ([B*K,S,E]).
    for dtype in ("float32", "bfloat16"):
      cache = jax.tree.map(lambda x: x + 1, llama.init_cache(c, 2, 8, dtype))
      grown = llama.grow_cache(cache, 12)
      assert llama.cache_len(cache) == 8 and llama.cache_len(grown) == 12
      k_axis = -1 if dtype == "float32" else -2
      for axis, olds, news in ((k_axis, cache.k, grown.k), (-2, cache.v, grown.v)):
        for old, new in zip(jax.tree.leaves(olds), jax.tree.leaves(news)):
          old = np.moveaxis(np.asarray(old, np.float32), axis, -1)
          new = np.moveaxis(np.asarray(new, np.float32), axis, -1)
          assert new.shape == old.shape[:-1] + (12,)
          np.testing.assert_array_equal(new[..., :8], old)
          assert not np.any(new[..., 8:])


def test_hidden_then_logits_is_the_forward(model, cfg):
  tokens = jnp.asarray(np.random.default_rng(10).integers(0, cfg.vocab_size, (2, 10)))
  h, _ = model.hidden(tokens)
  assert h.shape == (2, 10, cfg.dim)
  np.testing.assert_allclose(np.asarray(model.logits(h[:, 3])), _forward(model, tokens)[:, 3],
                             atol=1e-5)


# ---------------------------------------------------------------- remat and dtype

@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, state, tokens):
  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens)[0]
    # Logit-based and nonlinear so every weight gets a gradient.
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

  return jax.value_and_grad(loss)(state)


REMAT_TOKENS = np.random.default_rng(4).integers(0, 1024, (2, 16))


@pytest.fixture(scope="module")
def no_remat_grads(model):
  return _loss_and_grads(*nnx.split(model), jnp.asarray(REMAT_TOKENS))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_loss_and_grads(model, cfg, remat, no_remat_grads):
  loss0, g0 = no_remat_grads
  loss1, g1 = _loss_and_grads(*nnx.split(_with_cfg(model, remat=remat)),
                              jnp.asarray(REMAT_TOKENS))
  np.testing.assert_allclose(loss1, loss0, atol=1e-5, rtol=0)
  leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(leaves0) == len(leaves1) == 3 + 9 * (1 if cfg.scan_layers else cfg.n_layers)
  for a, b in zip(leaves0, leaves1):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
  assert max(float(jnp.abs(a).max()) for a in leaves0) > 1e-3  # gradients are not all zero


def test_bfloat16_compute_with_f32_params(model, cfg):
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 32))
  bf = _with_cfg(model, dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf)))
  logits16 = _forward(bf, tokens)
  logits32 = _forward(model, tokens)
  assert logits16.dtype == np.float32 and np.isfinite(logits16).all()
  err = np.abs(logits16 - logits32)
  scale = np.abs(logits32).max()
  # bf16 keeps ~3 significant digits: close, but not equal (so the dtype really is used).
  assert err.max() < 0.1 * scale, (err.max(), scale)
  assert err.max() > 1e-6
  assert (logits16.argmax(-1) == logits32.argmax(-1)).mean() > 0.9


# ---------------------------------------------------------------- config validation

def test_config_validation_errors():
  base = dict(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)
  with pytest.raises(ValueError, match=r"dim=66 is not divisible by n_heads=4"):
    ModelConfig(**{**base, "dim": 66})
  assert ModelConfig(**{**base, "dim": 66, "head_dim": 16}).head_dim == 16
  with pytest.raises(ValueError, match=r"rope_type='yarn'"):
    ModelConfig(**{**base, "rope_type": "yarn"})
  with pytest.raises(ValueError, match=r"needs rope_original_max_len"):
    ModelConfig(**{**base, "rope_type": "llama3", "rope_factor": 8.0})
  with pytest.raises(ValueError, match=r"n_kv_heads=3 must divide n_heads=4"):
    ModelConfig(**{**base, "n_kv_heads": 3})
  with pytest.raises(ValueError, match=r"n_kv_heads=8 must divide n_heads=4"):
    ModelConfig(**{**base, "n_kv_heads": 8})
  with pytest.raises(ValueError, match=r"remat='some'.*none, full, dots"):
    ModelConfig(**{**base, "remat": "some"})
  with pytest.raises(KeyError, match=r"unknown model config keys \['n_layer'\]"):
    ModelConfig.from_dict({**base, "n_layer": 2})
  # The accepted path: from_dict ignores the preset name and builds the config.
  assert ModelConfig.from_dict({**base, "preset": "tiny"}) == ModelConfig(**base)
  with pytest.raises(KeyError, match="unknown model preset"):
    preset("llama9_1t")


# ---------------------------------------------------------------- presets

# Published parameter counts (HF config.json + safetensors index of meta-llama/Llama-2-7b-hf,
# Llama-2-13b-hf, Meta-Llama-3-8B, Llama-3.1-8B, Llama-3.2-1B, -3B; HuggingFaceTB/SmolLM2-*).
PUBLISHED = {"llama2_7b": 6.74e9, "llama2_13b": 13.0e9, "llama3_8b": 8.03e9,
             "llama3_1_8b": 8.03e9, "llama3_2_1b": 1.24e9, "llama3_2_3b": 3.21e9,
             "smollm2_135m": 135e6, "smollm2_360m": 362e6, "smollm2_1_7b": 1.71e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
  cfg = preset(name)
  assert abs(cfg.num_params() - PUBLISHED[name]) / PUBLISHED[name] < 0.01
  # Abstract build: shapes only, no memory; its parameter count must equal the formula.
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params()


# (total, non-embedding) as published: Qwen2.5 and Qwen3 model cards ("Number of Parameters" and
# "(Non-Embedding)"), Gemma 2 and Gemma 3 technical reports (Table 1: embedding and non-embedding;
# Gemma 3 4B's text model without its 417M vision encoder), the gemma-3-270m model card. None: the
# card gives only the rounded name (Qwen3-1.7B's 1.72B total is 1.2% above "1.7B"; its
# non-embedding 1.41B is within 1% of the published 1.4B).
PUBLISHED_FAMILIES = {
    "qwen2_5_0_5b": (0.49e9, 0.36e9), "qwen2_5_1_5b": (1.54e9, 1.31e9),
    "qwen2_5_7b": (7.61e9, 6.53e9), "qwen3_0_6b": (0.6e9, 0.44e9), "qwen3_1_7b": (None, 1.4e9),
    "qwen3_8b": (8.2e9, 6.95e9), "gemma2_2b": (590_118_912 + 2_024_517_888, 2_024_517_888),
    "gemma2_9b": (917_962_752 + 8_324_201_984, 8_324_201_984), "gemma3_270m": (268e6, 100e6),
    "gemma3_1b": (1.0e9, 698e6), "gemma3_4b": (675e6 + 3209e6, 3209e6),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_FAMILIES))
def test_family_preset_parameter_counts(name):
  cfg = preset(name)
  total, non_embedding = PUBLISHED_FAMILIES[name]
  embedding = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
  assert abs(cfg.num_params() - embedding - non_embedding) / non_embedding < 0.01
  if total is not None:
    assert abs(cfg.num_params() - total) / total < 0.01
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params()


def test_relayout_round_trips_the_weights(model, cfg):
  from stable_alignment_jax.model import llama
  graphdef, state = nnx.split(model)
  g1, s1 = llama.relayout(graphdef, state, scan_layers=False)
  assert not nnx.merge(g1, s1).cfg.scan_layers
  unrolled = Llama(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(s1),
               nnx.to_pure_dict(nnx.state(unrolled)))
  g2, s2 = llama.relayout(g1, s1, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(s2), nnx.to_pure_dict(state))
  assert llama.relayout(graphdef, state, scan_layers=True)[1] is state  # already that layout


@pytest.mark.parametrize("t,blocks", [(37, 8), (16, 8), (5, 8), (24, 1)])
def test_causal_attention_equals_the_library_kernel_and_its_gradient(t, blocks):
  """The block-skipping attention against jax.nn.dot_product_attention's XLA path (the whole
  masked square), with GQA, a key mask and a ragged block split; values and gradients."""
  from stable_alignment_jax.model import llama
  rng = np.random.default_rng(11)
  b, h, k, e = 2, 6, 3, 8
  q, kk, v = (jnp.asarray(rng.normal(size=(b, t, n, e)), jnp.float32) for n in (h, k, k))
  key_mask = jnp.asarray(rng.random((b, t)) < 0.8).at[:, 0].set(True)
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & key_mask[:, None, None, :]
  w = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.float32)
  ours = lambda q, kk, v: jnp.sum(llama.causal_attention(q, kk, v, mask, blocks) * w)
  ref = lambda q, kk, v: jnp.sum(jax.nn.dot_product_attention(q, kk, v, mask=mask,
                                                              implementation="xla") * w)
  # jitted: run op by op, every block's distinct shapes would each compile (minutes, cold)
  np.testing.assert_allclose(
      jax.jit(llama.causal_attention, static_argnums=4)(q, kk, v, mask, blocks),
      jax.nn.dot_product_attention(q, kk, v, mask=mask), atol=2e-6)
  grads = lambda f: jax.jit(jax.grad(f, (0, 1, 2)))(q, kk, v)
  for g1, g2 in zip(grads(ours), grads(ref)):
    np.testing.assert_allclose(g1, g2, atol=2e-5)
