"""LLaMA decoder in Flax NNX, readable top to bottom.

RMSNorm -> rotary embeddings -> grouped-query attention (with an optional KV cache) -> SwiGLU MLP
-> decoder layer -> model. Weights are stored as einsum-shaped tensors with logical axis names
attached at creation (`_param`); activations are pinned by logical names at block edges
(`axes.constrain`). The rotary convention is Hugging Face's rotate-half form, so HF checkpoints
load without permuting q/k (see `convert.py`).

Shapes use the letters B batch, T query length, S key length (cache slots), D model dim,
H query heads, K kv heads, E head dim, F ffn dim, V vocab.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stable_alignment_jax.model import axes
from stable_alignment_jax.model.presets import ModelConfig

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [B, S, K, E]


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


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half form. x: [B, T, N, E]; positions: [B, T] int."""
  e = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))  # [E/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


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

  def __call__(self, x, positions, mask, cache_kv, cache_index):
    """x: [B,T,D]; mask: [B,1,T,S] bool; cache_kv: (k, v) [B,S,K,E] or None."""
    dt = self.cfg.dtype
    q = jnp.einsum("btd,dhe->bthe", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dke->btke", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dke->btke", x, self.wv[...].astype(dt))
    q = rope(q, positions, self.cfg.rope_theta)
    k = rope(k, positions, self.cfg.rope_theta)
    q = axes.constrain(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    if cache_kv is not None:
      # Write this chunk's keys/values at cache_index, then attend over the whole cache.
      ck, cv = cache_kv
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
      cache_kv = (k, v)
    k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    # Softmax in f32 inside the library kernel (cuDNN flash attention on GPU, XLA elsewhere);
    # it takes GQA directly (H a multiple of K), so K/V are never repeated in memory.
    out = jax.nn.dot_product_attention(q, k.astype(dt), v.astype(dt), mask=mask)
    out = jnp.einsum("bthe,hed->btd", out, self.wo[...].astype(dt))
    return out, cache_kv


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

  def __call__(self, x, positions, mask, cache_kv, cache_index):
    h, cache_kv = self.attn(self.attn_norm(x), positions, mask, cache_kv, cache_index)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)), cache_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing inside the layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_forward(layer, x, positions, mask, cache_kv, cache_index):
  return layer(x, positions, mask, cache_kv, cache_index)


class Llama(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = _param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.dim),
                        (axes.VOCAB_IN, axes.EMBED), pd)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.dtype, pd, rngs=rngs)
    self.lm_head = _param(rngs, _dense_init(cfg.dim), (cfg.dim, cfg.vocab_size),
                          (axes.EMBED, axes.VOCAB), pd)  # untied, as in LLaMA

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               key_mask: jax.Array | None = None, cache: KVCache | None = None,
               cache_index: Any = 0) -> tuple[jax.Array, KVCache | None]:
    """Returns (logits f32 [B,T,V], updated cache or None).

    tokens: [B,T] int. positions: [B,T] rotary positions (default 0..T-1).
    key_mask: [B,S] bool, True where a key slot holds a real token (S = T without a cache, the
      cache length with one); default all True. Attention is causal in slot order: the query in
      slot cache_index+i sees key slots <= cache_index+i that the key_mask allows.
    cache: per-layer (k, v) [B,S,K,E] from `init_cache`; the T new keys go to slots
      [cache_index, cache_index+T).
    """
    b, t = tokens.shape
    s = t if cache is None else cache[0][0].shape[1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_slot = cache_index + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None, None]
    if key_mask is not None:
      mask = mask & key_mask[:, None, None, :].astype(bool)

    dt = self.cfg.dtype
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    x = axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    forward = _layer_forward
    if self.cfg.remat != "none":
      forward = nnx.remat(_layer_forward, policy=_REMAT_POLICIES[self.cfg.remat])
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, kv = forward(layer, x, positions, mask, None if cache is None else cache[i], cache_index)
      new_cache.append(kv)
    x = self.final_norm(x)
    logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(dt))
    logits = axes.constrain(logits.astype(jnp.float32), (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    return logits, (None if cache is None else tuple(new_cache))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """Zeroed per-layer KV cache [B, S, K, E], in the compute dtype unless told otherwise."""
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  dt = dtype or cfg.dtype
  names = (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None)
  return tuple((axes.constrain(jnp.zeros(shape, dt), names),
                axes.constrain(jnp.zeros(shape, dt), names)) for _ in range(cfg.n_layers))
