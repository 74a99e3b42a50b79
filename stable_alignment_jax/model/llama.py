"""LLaMA decoder in Flax NNX, readable top to bottom.

RMSNorm -> rotary embeddings -> grouped-query attention (with an optional KV cache) -> SwiGLU MLP
-> decoder layer -> model. Weights are stored as einsum-shaped tensors with logical axis names
attached at creation (`_param`); activations are pinned by logical names at block edges
(`axes.constrain`). The rotary convention is Hugging Face's rotate-half form, so HF checkpoints
load without permuting q/k (see `convert.py`). The decoder layers are either a Python list or, with
`cfg.scan_layers`, ONE layer module whose weights carry a leading [L] axis, run under `lax.scan`:
compile time then does not grow with depth. The model owns its KV cache (`init_cache`), stored
heads-first so a decode step's two attention dots read it in place: values [N,S,E] with batch
and kv head joined in one leading axis N = B*K, and keys of an f32 cache transposed, [N,E,S], so
both dots contract a row-major operand's leading dim (on CPU the [S,E] key layout made the score
dot repack the whole cache each step: 1.5x slower decode at position 1024, batch 16). The joined
axis is the dots' only batch axis, so the cache the loop carries is the array the dots read and
the step writes; split [B,K,...] at batch 1, XLA's CPU backend copied every cache 4x a step to
reshape away the unit axis. A 16-bit cache keeps keys [N,S,E]: its slot is written through the
bits, which XLA's CPU backend does in place for a row but not for a column.

Everything that runs the model calls it: training (`__call__` / `hidden`), the sampler (prefill and
decode through `__call__` with a cache) and the MC scorer (`hidden`, then `logits` at the few
positions it scores).

Shapes use the letters B batch, T query length, S key length (cache slots), D model dim,
H query heads, K kv heads, E head dim, F ffn dim, V vocab.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stable_alignment_jax.model import axes
from stable_alignment_jax.model.presets import ModelConfig

class KVCache(NamedTuple):
  """Keys [B*K, E, S] (f32; [B*K, S, E] when 16-bit) and values [B*K, S, E] per layer: stacked
  with a leading [L] when the layers are scanned, tuples of L arrays otherwise. Made by
  `init_cache`; callers treat it as opaque (`cache_len` reads its length)."""
  k: Any
  v: Any


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  """One place that creates weights with logical names (Flax spells the metadata `out_sharding`).

  Eager sharding is off: shardings are resolved by `sharding.py` from these names, so creating
  a model never needs a mesh and the same code builds abstract, single-device and sharded models.
  """
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _dense_init(fan_in: int):
  return jax.nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype, param_dtype, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, jax.nn.initializers.ones, (dim,), (axes.NORM,), param_dtype)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)  # the variance in f32, as LLaMA does, also under bf16 compute
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [E/2] (f32, computed as transformers does), with the config's scaling.

  linear: every frequency divided by the factor (positions stretched). llama3 (LLaMA-3.1): long
  wavelengths (beyond original_len / low_freq_factor) divided by the factor, short ones (below
  original_len / high_freq_factor) kept, and a smooth interpolation between the two.
  """
  e = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, e, 2).astype(np.float32) /
                                                np.float32(e)))).astype(np.float32)
  if cfg.rope_type == "linear":
    return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  if cfg.rope_type == "llama3":
    f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    orig = cfg.rope_original_max_len
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > orig / lo, inv / f, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return np.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled).astype(np.float32)
  return inv


def rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Rotary embedding, rotate-half form. x: [B, T, N, E]; positions: [B, T] int."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, E/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# A cache array's first axis is batch and kv head in one, B*K (b major), split as both are.
_SE_NAMES = ((axes.BATCH, axes.ACT_KV_HEADS), axes.LENGTH, None)  # [B*K,S,E]: values, 16-bit keys
_ES_NAMES = ((axes.BATCH, axes.ACT_KV_HEADS), None, axes.LENGTH)  # [B*K,E,S]: f32 keys


_MATVEC_ROWS = 4  # decode query rows per kv head up to which CPU scores run as matvecs


def _keys_transposed(dtype) -> bool:
  """Whether a cache of this dtype stores its keys [N,E,S] (see the module docstring)."""
  return jnp.dtype(dtype).itemsize != 2


def _write(cache: jax.Array, new: jax.Array, index, axis: int) -> jax.Array:
  """cache with `new` at slots index.. along `axis` (1: values [N,S,E] <- [N,T,E]; 2: keys
  [N,E,S] <- [N,E,T], N = B*K), in place under a loop's donation.

  A 16-bit float cache is written through its bits: XLA's CPU backend widens a bf16
  dynamic-update-slice to f32 and back, a copy of the whole cache every decode step."""
  at = (0, index, 0) if axis == 1 else (0, 0, index)
  new = new.astype(cache.dtype)
  if cache.dtype.itemsize != 2:
    return jax.lax.dynamic_update_slice(cache, new, at)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  out = jax.lax.dynamic_update_slice(bits(cache), bits(new), at)
  return jax.lax.bitcast_convert_type(out, cache.dtype)


def causal_attention(q, k, v, mask, blocks: int = 8):
  """Causal self-attention of a chunk: q [B,T,H,E], k/v [B,S,K,E] (GQA: H a multiple of K; S >= T,
  the queries being the last T of the S slots), mask [B,1,T,S] bool (causal, and-ed with the key
  mask) -> [B,T,H,E].

  The queries run in `blocks` row blocks, each over the keys up to its own end, so the score
  blocks above the diagonal are never computed (at 8 blocks, 28 of 64: 44% of the scores and
  their gradients). The library's XLA attention computes the whole T x T square and masks it;
  on CPU this is 11% of a training step of benchmarks/train_step.py's model. Softmax in f32.
  """
  b, t, h, e = q.shape
  kh, off = k.shape[2], k.shape[1] - t
  qg = q.reshape(b, t, kh, h // kh, e)
  bounds = [round(i * t / min(blocks, t)) for i in range(min(blocks, t) + 1)]
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    s = jnp.einsum("btkge,bske->bkgts", qg[:, lo:hi], k[:, :off + hi],
                   preferred_element_type=jnp.float32) * e**-0.5
    s = jnp.where(mask[:, :, None, lo:hi, :off + hi], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bkgts,bske->btkge", p, v[:, :off + hi]))
  return jnp.concatenate(outs, axis=1).reshape(b, t, h, e)


def _self_attention(q, k, v, mask):
  """Attention of a chunk over its own keys: cuDNN's flash kernel on GPU (softmax in f32 inside;
  GQA taken directly, K/V never repeated), `causal_attention` elsewhere."""
  if jax.default_backend() == "gpu":
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  return causal_attention(q, k, v, mask)


def segment_attention(q, k, v, segments):
  """Attention within packed rows [prefix of P slots | R segments of equal length] (see
  `Llama.hidden`): the prefix is causal in itself; each segment sees the whole prefix, then
  itself causally, never another segment. The prefix's keys are computed once and read by all
  R segments (R responses to one prompt), each of which attends as the unpacked row would."""
  plen, r = segments
  b, n, h, e = q.shape
  t = (n - plen) // r
  pre = lambda x: x[:, :plen]
  # [B, R*T, ...] -> [B*R, T, ...]: b-major, so a batch-sharded row stays on its devices
  rows = lambda x: x[:, plen:].reshape(b * r, t, *x.shape[2:])
  with_prefix = lambda x: jnp.concatenate(
      [jnp.repeat(pre(x), r, axis=0), rows(x)], axis=1)  # [B*R, P+T, ...]
  tril = lambda m, n: jnp.tril(jnp.ones((m, n), bool), n - m)[None, None]
  out_p = _self_attention(pre(q), pre(k), pre(v), tril(plen, plen))
  out_r = _self_attention(rows(q), with_prefix(k), with_prefix(v), tril(t, plen + t))
  return jnp.concatenate([out_p, out_r.reshape(b, r * t, h, e)], axis=1)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, e, pd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    init = _dense_init(d)
    self.wq = _param(rngs, init, (d, h, e), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), pd)
    self.wk = _param(rngs, init, (d, k, e), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
    self.wv = _param(rngs, init, (d, k, e), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
    self.wo = _param(rngs, _dense_init(h * e), (h, e, d),
                     (axes.HEADS, axes.HEAD_DIM, axes.EMBED), pd)
    self.cfg = cfg

  def __call__(self, x, positions, mask, cache_kv, cache_index, segments=None):
    """x: [B,T,D]; mask: [B,1,T,S] bool; cache_kv: this layer's (k, v) as `KVCache` lays them
    out, or None; segments: None, or a packed row's layout (see `Llama.hidden`).

    Without a cache (training, scoring) attention runs over the chunk itself: in cuDNN's flash
    kernel on GPU, elsewhere in `causal_attention`. With one, the chunk's keys/values are
    written at slot `cache_index`; a prefill (static cache_index 0) still attends within the chunk,
    a decode step attends over the heads-first cache with two einsums that read it in place.
    """
    cfg, dt = self.cfg, self.cfg.dtype
    inv_freq = rope_frequencies(cfg)
    q = jnp.einsum("btd,dhe->bthe", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dke->btke", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dke->btke", x, self.wv[...].astype(dt))
    q = rope(q, positions, inv_freq)
    k = rope(k, positions, inv_freq)
    q = axes.constrain(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    if segments is not None:  # packed prompt and responses (training): no cache
      k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      out = segment_attention(q, k, v, segments)
      return self._out(out), None
    prefill = isinstance(cache_index, int) and cache_index == 0
    if cache_kv is not None:
      ck, cv = cache_kv
      # [B,T,K,E] -> [B*K,T,E], the cache's row layout
      heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])
      if _keys_transposed(ck.dtype):
        kt = heads_first(k).transpose(0, 2, 1)
        ck = axes.constrain(_write(ck, kt, cache_index, 2), _ES_NAMES)
      else:
        ck = axes.constrain(_write(ck, heads_first(k), cache_index, 1), _SE_NAMES)
      cv = axes.constrain(_write(cv, heads_first(v), cache_index, 1), _SE_NAMES)
      cache_kv = (ck, cv)
    if cache_kv is None or prefill:
      t = x.shape[1]
      k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      out = _self_attention(q, k, v, mask[..., :t])
    else:
      b, t, h, e = q.shape
      kh, g = cfg.n_kv_heads, h // cfg.n_kv_heads
      # Query head h uses kv head h // G (the GQA grouping of HF and dot_product_attention).
      # The T queries of a kv head share one [T*G, S] score matrix, so each dot is a plain
      # batched matmul over the cache as it lies (no transpose of the cache).
      # A cache narrower than the compute dtype (bf16 under f32) is read as it lies: the query
      # and the probabilities are rounded to its dtype and the dots accumulate in f32, so no
      # widened copy of the cache is made each step (the error is that of the cache's rounding).
      rd = ck.dtype if jnp.finfo(ck.dtype).bits < jnp.finfo(dt).bits else dt
      qg = q.reshape(b, t, kh, g, e).transpose(0, 2, 1, 3, 4).reshape(b * kh, t * g, e)
      keys = "nes" if _keys_transposed(ck.dtype) else "nse"
      score = lambda qg: jnp.einsum(f"nqe,{keys}->nqs", qg.astype(rd), ck.astype(rd),
                                    preferred_element_type=jnp.float32)
      # One matrix-vector product per query row: XLA's CPU dot packs the [E,S] cache for a
      # [T*G, E] x [E, S] product, and at T*G = 2 the packing costs more than reading the
      # cache twice (one layer, batch 16, 1088 slots, cold cache: 0.99 -> 0.59 ms; the decode
      # loop of benchmarks/generate.py at position 1024: 11.8 -> 9.6 ms a step). The value
      # product likewise: as fast as one dot under XLA's default CPU dots, 24% faster under
      # the ones the sampler compiles its decode with (`generate.decode_compiler_options`).
      rows = keys == "nes" and t * g <= _MATVEC_ROWS and jax.default_backend() == "cpu"
      per_row = lambda f, x: (jnp.concatenate([f(x[:, i:i + 1]) for i in range(t * g)], axis=1)
                              if rows else f(x))
      scores = per_row(score, qg)
      scores = scores * e**-0.5
      s = mask.shape[-1]
      m = jnp.broadcast_to(mask[:, :, :, None], (b, kh, t, g, s)).reshape(b * kh, t * g, s)
      scores = jnp.where(m, scores, -1e30)
      probs = jax.nn.softmax(scores, axis=-1).astype(rd)
      value = lambda p: jnp.einsum("nqs,nse->nqe", p, cv.astype(rd),
                                   preferred_element_type=jnp.float32)
      out = per_row(value, probs).astype(dt)
      out = out.reshape(b, kh, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)
    return self._out(out), cache_kv

  def _out(self, out):
    """The output projection [B,T,H,E] -> [B,T,D] as one [H*E, D] matmul. Contracting (h, e) as
    two axes, XLA's compiled dot transposed the [H,E,D] weight to [E,H,D] first: a copy of the
    weight in every decode step and training layer (b1 decode at position 32: 0.72 -> 0.62 ms)."""
    wo = self.wo[...].astype(self.cfg.dtype)
    flat = out.reshape(*out.shape[:2], -1)
    return jnp.einsum("btf,fd->btd", flat, wo.reshape(-1, wo.shape[-1]))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.dim, cfg.ffn_dim, cfg.param_dtype
    self.w_gate = _param(rngs, _dense_init(d), (d, f), (axes.EMBED, axes.MLP), pd)
    self.w_up = _param(rngs, _dense_init(d), (d, f), (axes.EMBED, axes.MLP), pd)
    self.w_down = _param(rngs, _dense_init(f), (f, d), (axes.MLP, axes.EMBED), pd)
    self.dtype = cfg.dtype

  def __call__(self, x):
    dt = self.dtype
    gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dt))
    up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dt))
    h = axes.constrain(jax.nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return jnp.einsum("btf,fd->btd", h, self.w_down[...].astype(dt))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    args = (cfg.dim, cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    self.attn_norm = RMSNorm(*args, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(*args, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, mask, cache_kv, cache_index, segments=None):
    h, cache_kv = self.attn(self.attn_norm(x), positions, mask, cache_kv, cache_index, segments)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)), cache_kv


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """One DecoderLayer whose every weight has a leading [L] axis (logical name `layers`).

  The L layers are initialised one by one (same draws as the unscanned model) and stacked, so a
  scanned and an unscanned model from the same seed hold the same weights.
  """
  layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
  graphdef, state = nnx.split(layers[0])
  states = [nnx.split(layer)[1] for layer in layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for _, var in nnx.to_flat_state(stacked):
    var.set_metadata(out_sharding=(axes.LAYERS,) + tuple(var.get_metadata()["out_sharding"]))
  del state
  return nnx.merge(graphdef, stacked)


_REMAT_POLICIES = {
    "full": None,  # save nothing inside the layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = _param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.dim),
                        (axes.VOCAB_IN, axes.EMBED), pd)
    if cfg.scan_layers:
      self.layers = _stacked_layers(cfg, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.dtype, pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, _dense_init(cfg.dim), (cfg.dim, cfg.vocab_size),
                            (axes.EMBED, axes.VOCAB), pd)

  def __call__(self, tokens: jax.Array, **kw) -> tuple[jax.Array, KVCache | None]:
    """Returns (logits f32 [B,T,V], updated cache or None); arguments as `hidden`."""
    h, cache = self.hidden(tokens, **kw)
    return self.logits(h), cache

  def logits(self, h: jax.Array) -> jax.Array:
    """The LM head on final hidden states [..., D] -> f32 [..., V] (the embedding when tied)."""
    dt = self.cfg.dtype
    if self.cfg.tie_embeddings:
      out = jnp.einsum("...d,vd->...v", h, self.embed[...].astype(dt))
    else:
      out = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(dt))
    out = out.astype(jnp.float32)
    if out.ndim == 3:
      out = axes.constrain(out, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    return out

  def hidden(self, tokens: jax.Array, *, positions: jax.Array | None = None,
             key_mask: jax.Array | None = None, cache: KVCache | None = None,
             cache_index: Any = 0, segments: tuple[int, int] | None = None
             ) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [B,T,D] (compute dtype), and the updated cache or None.

    tokens: [B,T] int. positions: [B,T] rotary positions (default 0..T-1).
    key_mask: [B,S] bool, True where a key slot holds a real token (S = T without a cache, the
      cache length with one); default all True. Attention is causal in slot order: the query in
      slot cache_index+i sees key slots <= cache_index+i that the key_mask allows.
    cache: from `init_cache`; the T new keys go to slots [cache_index, cache_index+T). A static
      cache_index of 0 is a prefill: the chunk attends within itself.
    segments: (P, R), static: each row packs a prefix of P tokens and R segments of equal length
      (R responses to one prompt, the prompt once: `train.response_logprobs`). The prefix is
      causal in itself; each segment attends to the whole prefix and causally to itself, never to
      another segment, so with `positions` continuing the prefix in every segment, each
      segment's hidden states are those of its own unpacked row. No cache or key_mask.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if segments is not None and (cache is not None or key_mask is not None or
                                 segments[0] < 1 or (t - segments[0]) % segments[1]):
      raise ValueError(f"segments={segments} for {t} tokens: a prefix of at least one token and "
                       "equal segments, without a cache or key mask")
    s = t if cache is None else cache_len(cache)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_slot = cache_index + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None, None]  # [1,1,T,S]
    if key_mask is not None:
      mask = mask & key_mask[:, None, None, :].astype(bool)

    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
    x = axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

    def forward(layer, x, kv):
      return layer(x, positions, mask, kv, cache_index, segments)

    if cfg.remat != "none":
      forward = nnx.remat(forward, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, xs):
        layer_state, kv = xs
        x, kv = forward(nnx.merge(graphdef, layer_state), x, kv)
        return x, kv

      kv_in = None if cache is None else (cache.k, cache.v)
      x, kv_out = jax.lax.scan(body, x, (stacked, kv_in))
      new_cache = None if cache is None else KVCache(*kv_out)
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        x, kv = forward(layer, x, None if cache is None else (cache.k[i], cache.v[i]))
        if kv is not None:
          ks.append(kv[0])
          vs.append(kv[1])
      new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs))
    return self.final_norm(x), new_cache


def relayout(graphdef, state, *, scan_layers: bool, **changes):
  """The same weights in the other layer layout: stacked [L, ...] <-> one entry per layer.
  `changes`: other config fields that leave the weights as they are (e.g. remat, dtype).

  Training wants the scan (compile time flat in depth); decoding wants the unrolled layers
  (MaxText decodes unscanned too): under a scan every step would copy each layer's cache slice in
  and out of the stacked cache, which costs more than the attention that reads it.
  """
  cfg = nnx.merge(graphdef, state).cfg
  target = dataclasses.replace(cfg, scan_layers=scan_layers, **changes)
  if target == cfg:
    return graphdef, state
  new_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(target, rngs=nnx.Rngs(0))))
  if cfg.scan_layers == scan_layers:
    return new_graphdef, state
  pure = nnx.to_pure_dict(state)
  if scan_layers:
    per_layer = [pure["layers"][i] for i in range(cfg.n_layers)]
    pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  else:
    pure["layers"] = {i: jax.tree.map(lambda w, i=i: w[i], pure["layers"])
                      for i in range(cfg.n_layers)}
  nnx.replace_by_pure_dict(abstract, pure)
  return new_graphdef, abstract


def cache_len(cache: KVCache) -> int:
  """The number of slots of a cache from `init_cache`."""
  v = cache.v[0] if isinstance(cache.v, (tuple, list)) else cache.v
  return v.shape[-2]


def grow_cache(cache: KVCache, length: int) -> KVCache:
  """The same cache with `length` slots (>= its own): the new slots, at the end, are zeros."""
  def grow(x, axis, names):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return axes.constrain(jnp.pad(x, pad), (None,) * (x.ndim - 3) + names)
  grow_k = lambda x: (grow(x, -1, _ES_NAMES) if _keys_transposed(x.dtype)
                      else grow(x, -2, _SE_NAMES))
  return KVCache(jax.tree.map(grow_k, cache.k),
                 jax.tree.map(lambda x: grow(x, -2, _SE_NAMES), cache.v))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """A zeroed KV cache of `length` slots, in the compute dtype unless told otherwise."""
  dt = dtype or cfg.dtype
  n, e = batch * cfg.n_kv_heads, cfg.head_dim

  def zeros(shape, names):
    if cfg.scan_layers:
      return axes.constrain(jnp.zeros((cfg.n_layers,) + shape, dt), (None,) + names)
    return tuple(axes.constrain(jnp.zeros(shape, dt), names) for _ in range(cfg.n_layers))
  keys = ((n, e, length), _ES_NAMES) if _keys_transposed(dt) else ((n, length, e), _SE_NAMES)
  return KVCache(zeros(*keys), zeros((n, length, e), _SE_NAMES))
