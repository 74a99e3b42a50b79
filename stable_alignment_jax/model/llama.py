"""The decoder of every family we load (LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3) in Flax NNX,
readable top to bottom.

RMSNorm -> rotary embeddings -> grouped-query attention (with an optional KV cache) -> gated MLP
-> decoder layer -> model. The families differ only in `ModelConfig` fields, each read at the one
place it acts: q/k/v biases (Qwen2), per-head q/k norms (Qwen3, Gemma 3), the (1 + w) norm weight,
post-norms, GeGLU, sqrt(dim)-scaled embeddings, query_pre_attn_scalar and soft-capping (Gemma),
sliding-window layers in the checkpoint's pattern with their own RoPE base (Mistral, Gemma).
Weights are stored as einsum-shaped tensors with logical axis names attached at creation
(`_param`); activations are pinned by logical names at block edges (`axes.constrain`). The rotary
convention is Hugging Face's rotate-half form, so HF checkpoints load without permuting q/k (see
`convert.py`). The decoder layers are either a Python list or, with `cfg.scan_layers`, ONE layer
module whose weights carry a leading [L] axis, run under `lax.scan`: compile time then does not
grow with depth (a layer's window and RoPE frequencies ride along as scanned arrays when the
layers differ). The attention ops and the KV cache's layout are `attention.py`'s; the model owns
its cache (`init_cache`).

Everything that runs the model calls it: training (`__call__` / `hidden`), the sampler (prefill and
decode through `__call__` with a cache) and the MC scorer (`hidden`, then `logits` at the few
positions it scores).

Shapes use the letters B batch, T query length, S key length (cache slots), D model dim,
H query heads, K kv heads, E head dim, F ffn dim, V vocab.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stable_alignment_jax.model import axes
from stable_alignment_jax.model.attention import (  # noqa: F401  (the model's API)
    KVCache, cache_len, causal_attention, decode_attention, grow_cache, init_cache, rope,
    ring_view, rope_frequencies, segment_attention, self_attention, window_mask, write_cache)
from stable_alignment_jax.model.presets import ModelConfig

# A full layer's window in a scanned stack that mixes full and sliding layers: beyond any slot.
_NO_WINDOW = 2**30


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  """One place that creates weights with logical names (Flax spells the metadata `out_sharding`).

  Eager sharding is off: shardings are resolved by `sharding.py` from these names, so creating
  a model never needs a mesh and the same code builds abstract, single-device and sharded models.
  """
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _dense_init(fan_in: int):
  return jax.nn.initializers.normal(stddev=fan_in**-0.5)


def _project(module: nnx.Module, name: str, spec: str, x, dt):
  """x through the projection weight `name` of `module`, plus its LoRA adapter's delta when one
  is attached (`model/lora.py` sets it as `lora_<name>`; the weight may be a quantized stand-in
  that dequantizes on `[...]`). The adapter's path is added, never merged into the weight."""
  y = jnp.einsum(spec, x, getattr(module, name)[...].astype(dt))
  adapter = getattr(module, "lora_" + name, None)
  return y if adapter is None else y + adapter(x, dt)


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + w): offset 0 (LLaMA, Qwen) or 1 (Gemma, whose w starts at zero)."""

  def __init__(self, dim: int, eps: float, dtype, param_dtype, *, rngs: nnx.Rngs,
               offset: float = 0.0):
    init = jax.nn.initializers.constant(1.0 - offset)
    self.scale = _param(rngs, init, (dim,), (axes.NORM,), param_dtype)
    self.eps, self.dtype, self.offset = eps, dtype, offset

  def __call__(self, x):
    x32 = x.astype(jnp.float32)  # the variance in f32, as LLaMA does, also under bf16 compute
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (scale + self.offset if self.offset else scale)).astype(self.dtype)


def _norm(cfg: ModelConfig, dim: int, rngs: nnx.Rngs) -> RMSNorm:
  return RMSNorm(dim, cfg.norm_eps, cfg.dtype, cfg.param_dtype, rngs=rngs, offset=cfg.norm_offset)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, e, pd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    init = _dense_init(d)
    self.wq = _param(rngs, init, (d, h, e), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), pd)
    self.wk = _param(rngs, init, (d, k, e), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
    self.wv = _param(rngs, init, (d, k, e), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), pd)
    self.wo = _param(rngs, _dense_init(h * e), (h, e, d),
                     (axes.HEADS, axes.HEAD_DIM, axes.EMBED), pd)
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.bq = _param(rngs, zeros, (h, e), (axes.HEADS, axes.HEAD_DIM), pd)
      self.bk = _param(rngs, zeros, (k, e), (axes.KV_HEADS, axes.HEAD_DIM), pd)
      self.bv = _param(rngs, zeros, (k, e), (axes.KV_HEADS, axes.HEAD_DIM), pd)
    if cfg.qk_norm:
      self.q_norm = _norm(cfg, e, rngs)
      self.k_norm = _norm(cfg, e, rngs)
    self.cfg = cfg

  def __call__(self, x, positions, mask, cache_kv, cache_index, segments=None, *,
               inv_freq, window=0):
    """x: [B,T,D]; mask: [B,1,T,S] bool (causal and key mask); cache_kv: this layer's (k, v) as
    `KVCache` lays them out, or None; segments: None, or a packed row's layout (see
    `Llama.hidden`); inv_freq: this layer's RoPE frequencies; window: this layer's sliding
    window (0: full attention; traced under a scan over mixed layers).

    Without a cache (training, scoring) attention runs over the chunk itself: in cuDNN's flash
    kernel on GPU, elsewhere in `causal_attention`. With one, the chunk's keys/values are
    written at slot `cache_index`; a prefill (static cache_index 0) still attends within the chunk,
    a decode step attends over the heads-first cache with two einsums that read it in place.
    """
    cfg, dt = self.cfg, self.cfg.dtype
    q = _project(self, "wq", "btd,dhe->bthe", x, dt)
    k = _project(self, "wk", "btd,dke->btke", x, dt)
    v = _project(self, "wv", "btd,dke->btke", x, dt)
    if cfg.qkv_bias:
      q, k, v = (y + bias[...].astype(dt) for y, bias in ((q, self.bq), (k, self.bk), (v, self.bv)))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions, inv_freq)
    k = rope(k, positions, inv_freq)
    q = axes.constrain(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    kw = dict(scale=scale, softcap=cfg.attn_softcap, window=window)
    if segments is not None:  # packed prompt and responses (training): no cache
      k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      return self._out(segment_attention(q, k, v, segments, **kw)), None
    if not isinstance(window, int) or window > 0:
      mask = mask & window_mask(cache_index + jnp.arange(x.shape[1]), mask.shape[-1], window)
    prefill = isinstance(cache_index, int) and cache_index == 0
    if cache_kv is not None:
      cache_kv = write_cache(cache_kv, k, v, cache_index, slots=mask.shape[-1])
    if cache_kv is None or prefill:
      t = x.shape[1]
      k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
      out = self_attention(q, k, v, mask[..., :t], **kw)
    else:
      ring = cache_kv[1].shape[1]  # a local layer's ring holds only its window's slots
      if ring < mask.shape[-1]:
        mask = ring_view(mask, cache_index, x.shape[1], ring)
      out = decode_attention(q, *cache_kv, mask, dtype=dt, scale=scale, softcap=cfg.attn_softcap)
    return self._out(out), cache_kv

  def _out(self, out):
    """The output projection [B,T,H,E] -> [B,T,D] as one [H*E, D] matmul. Contracting (h, e) as
    two axes, XLA's compiled dot transposed the [H,E,D] weight to [E,H,D] first: a copy of the
    weight in every decode step and training layer (b1 decode at position 32: 0.72 -> 0.62 ms)."""
    wo = self.wo[...].astype(self.cfg.dtype)
    flat = out.reshape(*out.shape[:2], -1)
    y = jnp.einsum("btf,fd->btd", flat, wo.reshape(-1, wo.shape[-1]))
    adapter = getattr(self, "lora_wo", None)
    return y if adapter is None else y + adapter(out, self.cfg.dtype)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
  """Gated: down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-approximate gelu (GeGLU)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.dim, cfg.ffn_dim, cfg.param_dtype
    self.w_gate = _param(rngs, _dense_init(d), (d, f), (axes.EMBED, axes.MLP), pd)
    self.w_up = _param(rngs, _dense_init(d), (d, f), (axes.EMBED, axes.MLP), pd)
    self.w_down = _param(rngs, _dense_init(f), (f, d), (axes.MLP, axes.EMBED), pd)
    self.dtype, self.act = cfg.dtype, cfg.mlp_act

  def __call__(self, x):
    dt = self.dtype
    gate = _project(self, "w_gate", "btd,df->btf", x, dt)
    up = _project(self, "w_up", "btd,df->btf", x, dt)
    h = axes.constrain(_ACTIVATIONS[self.act](gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return _project(self, "w_down", "btf,fd->btd", h, dt)


class DecoderLayer(nnx.Module):
  """x + [post_norm](attn(norm(x))), then the same around the MLP; the post-norms are Gemma's."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, cfg.dim, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _norm(cfg, cfg.dim, rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.post_norms:
      self.attn_post_norm = _norm(cfg, cfg.dim, rngs)
      self.mlp_post_norm = _norm(cfg, cfg.dim, rngs)
    self.post_norms = cfg.post_norms

  def __call__(self, x, positions, mask, cache_kv, cache_index, segments=None, **attn_kw):
    h, cache_kv = self.attn(self.attn_norm(x), positions, mask, cache_kv, cache_index, segments,
                            **attn_kw)
    x = x + (self.attn_post_norm(h) if self.post_norms else h)
    h = self.mlp(self.mlp_norm(x))
    x = x + (self.mlp_post_norm(h) if self.post_norms else h)
    return axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)), cache_kv


def layer_attention(cfg: ModelConfig, i: int) -> tuple[np.ndarray, int]:
  """Layer i's (RoPE frequencies, sliding window or 0)."""
  sliding = cfg.is_sliding(i)
  return rope_frequencies(cfg, sliding), cfg.sliding_window if sliding else 0


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
    self.final_norm = _norm(cfg, cfg.dim, rngs)
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
    if self.cfg.final_softcap:
      out = self.cfg.final_softcap * jnp.tanh(out / self.cfg.final_softcap)
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
    if cfg.embed_scale:  # in the compute dtype, as transformers rounds it to the weights'
      x = x * jnp.asarray(cfg.dim**0.5, cfg.dtype)
    x = axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

    def checkpointed(**static):  # a window given here stays a Python int (slicing, block skip)
      def forward(layer, x, kv, *traced):  # traced: (inv_freq, window) scanned with the layer
        kw = static or dict(zip(("inv_freq", "window"), traced))
        return layer(x, positions, mask, kv, cache_index, segments, **kw)
      if cfg.remat == "none":
        return forward
      return nnx.remat(forward, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)

    per_layer = [layer_attention(cfg, i) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.layers)
      kv_in = None if cache is None else (cache.k, cache.v)
      if all(w == per_layer[0][1] and np.array_equal(f, per_layer[0][0]) for f, w in per_layer):
        step = checkpointed(inv_freq=per_layer[0][0], window=per_layer[0][1])
        xs = (stacked, kv_in)
        body = lambda x, xs: step(nnx.merge(graphdef, xs[0]), x, xs[1])
      else:  # the layers differ (Gemma's local and global): their settings scanned with them
        step = checkpointed()
        xs = (stacked, kv_in, np.stack([f for f, _ in per_layer]),
              np.array([w or _NO_WINDOW for _, w in per_layer], np.int32))
        body = lambda x, xs: step(nnx.merge(graphdef, xs[0]), x, xs[1], xs[2], xs[3])
      x, kv_out = jax.lax.scan(body, x, xs)
      new_cache = None if cache is None else KVCache(*kv_out)
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        inv_freq, window = per_layer[i]
        x, kv = checkpointed(inv_freq=inv_freq, window=window)(
            layer, x, None if cache is None else (cache.k[i], cache.v[i]))
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
