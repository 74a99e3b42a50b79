"""The attention ops of `llama.py`'s decoder and the KV cache they read: rotary embeddings,
chunk attention (training, prefill, packed segments), the cached decode step, and the cache's
layout. Functions of arrays only; the weights live in `llama.Attention`.

Every op takes the family's knobs as arguments: `scale` (the scores' factor: head_dim**-0.5, or
Gemma's query_pre_attn_scalar**-0.5), `softcap` (Gemma 2's cap * tanh(s / cap) on the scores, 0
off) and `window` (a sliding layer's: a query sees the keys less than `window` slots back, itself
included; 0 off). A window is applied in slot order, which is position order in every row we
build (left padding shifts a row's slots and positions alike), so it is transformers'
`kv_idx > q_idx - sliding_window`. A static window also bounds the work: chunk attention skips
key blocks wholly behind it, and in an unscanned model with a global layer (Gemma, Qwen's
windowed layers) a local layer's decode cache is a ring of its window's slots (`ring_len`).

The cache is stored heads-first so a decode step's two attention dots read it in place: values
[N,S,E] with batch and kv head joined in one leading axis N = B*K, and keys of an f32 cache
transposed, [N,E,S], so both dots contract a row-major operand's leading dim (on CPU the [S,E]
key layout made the score dot repack the whole cache each step: 1.5x slower decode at position
1024, batch 16). The joined axis is the dots' only batch axis, so the cache the loop carries is
the array the dots read and the step writes; split [B,K,...] at batch 1, XLA's CPU backend copied
every cache 4x a step to reshape away the unit axis. A 16-bit cache keeps keys [N,S,E]: its slot
is written through the bits, which XLA's CPU backend does in place for a row but not a column.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stable_alignment_jax.model import axes
from stable_alignment_jax.model.presets import ModelConfig


# ----------------------------------------------------------------------------- rotary


def rope_frequencies(cfg: ModelConfig, sliding: bool = False) -> np.ndarray:
  """Inverse frequencies [E/2] (f32, computed as transformers does), with the config's scaling.

  linear: every frequency divided by the factor (positions stretched). llama3 (LLaMA-3.1): long
  wavelengths (beyond original_len / low_freq_factor) divided by the factor, short ones (below
  original_len / high_freq_factor) kept, and a smooth interpolation between the two.
  A sliding layer of a config with `rope_local_theta` (Gemma 3) uses that base, unscaled.
  """
  e = cfg.head_dim
  local = sliding and cfg.rope_local_theta > 0
  theta = cfg.rope_local_theta if local else cfg.rope_theta
  inv = (1.0 / (np.float32(theta) ** (np.arange(0, e, 2).astype(np.float32) /
                                      np.float32(e)))).astype(np.float32)
  if local or cfg.rope_type == "default":
    return inv
  if cfg.rope_type == "linear":
    return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  orig = cfg.rope_original_max_len  # llama3
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > orig / lo, inv / f, inv)
  smooth = (orig / wavelen - lo) / (hi - lo)
  medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
  return np.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Rotary embedding, rotate-half form. x: [B, T, N, E]; positions: [B, T] int."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, E/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- scores


def _capped(s, softcap: float):
  return s if not softcap else softcap * jnp.tanh(s / softcap)


def window_mask(q_slots, s: int, window):
  """[T, S] bool: key slot j is within the window of query slot i (i - j < window). `window` may
  be traced (a scanned stack of mixed layers); a full layer's is then larger than any slot."""
  return (q_slots[:, None] - jnp.arange(s)[None, :]) < window


def causal_attention(q, k, v, mask, blocks: int = 8, *, scale: float | None = None,
                     softcap: float = 0.0, window: int = 0):
  """Causal self-attention of a chunk: q [B,T,H,E], k/v [B,S,K,E] (GQA: H a multiple of K; S >= T,
  the queries being the last T of the S slots), mask [B,1,T,S] bool (causal, and-ed with the key
  mask and any window) -> [B,T,H,E].

  The queries run in `blocks` row blocks, each over the keys up to its own end (and from its
  start's window on, for a static `window`), so the score blocks above the diagonal are never
  computed (at 8 blocks, 28 of 64: 44% of the scores and their gradients). The library's XLA
  attention computes the whole T x T square and masks it; on CPU this is 11% of a training step of
  benchmarks/train_step.py's model. Softmax in f32.
  """
  b, t, h, e = q.shape
  kh, off = k.shape[2], k.shape[1] - t
  scale = e**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, h // kh, e)
  bounds = [round(i * t / min(blocks, t)) for i in range(min(blocks, t) + 1)]
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    k0 = max(0, off + lo - window + 1) if isinstance(window, int) and window > 0 else 0
    s = jnp.einsum("btkge,bske->bkgts", qg[:, lo:hi], k[:, k0:off + hi],
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, :, None, lo:hi, k0:off + hi], _capped(s, softcap), -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bkgts,bske->btkge", p, v[:, k0:off + hi]))
  return jnp.concatenate(outs, axis=1).reshape(b, t, h, e)


def self_attention(q, k, v, mask, *, scale: float, softcap: float = 0.0, window=0):
  """Attention of a chunk over its own keys: cuDNN's flash kernel on GPU (softmax in f32 inside;
  GQA taken directly, K/V never repeated), `causal_attention` elsewhere and wherever the kernel
  cannot compute the family's scores (soft-capping)."""
  if jax.default_backend() == "gpu" and not softcap:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
  return causal_attention(q, k, v, mask, scale=scale, softcap=softcap,
                          window=window if isinstance(window, int) else 0)


def segment_attention(q, k, v, segments, *, scale: float, softcap: float = 0.0, window=0):
  """Attention within packed rows [prefix of P slots | R segments of equal length] (see
  `Llama.hidden`): the prefix is causal in itself; each segment sees the whole prefix, then
  itself causally, never another segment. The prefix's keys are computed once and read by all
  R segments (R responses to one prompt), each of which attends as the unpacked row would (its
  window too: in [prefix | segment] slots are the unpacked row's positions)."""
  plen, r = segments
  b, n, h, e = q.shape
  t = (n - plen) // r
  pre = lambda x: x[:, :plen]
  # [B, R*T, ...] -> [B*R, T, ...]: b-major, so a batch-sharded row stays on its devices
  rows = lambda x: x[:, plen:].reshape(b * r, t, *x.shape[2:])
  with_prefix = lambda x: jnp.concatenate(
      [jnp.repeat(pre(x), r, axis=0), rows(x)], axis=1)  # [B*R, P+T, ...]

  def tril(m, n):
    causal = jnp.tril(jnp.ones((m, n), bool), n - m)
    if not isinstance(window, int) or window > 0:
      causal = causal & window_mask(jnp.arange(n - m, n), n, window)
    return causal[None, None]
  kw = dict(scale=scale, softcap=softcap, window=window)
  out_p = self_attention(pre(q), pre(k), pre(v), tril(plen, plen), **kw)
  out_r = self_attention(rows(q), with_prefix(k), with_prefix(v), tril(t, plen + t), **kw)
  return jnp.concatenate([out_p, out_r.reshape(b, r * t, h, e)], axis=1)


# ----------------------------------------------------------------------------- the KV cache


class KVCache(NamedTuple):
  """Keys [B*K, E, S] (f32; [B*K, S, E] when 16-bit) and values [B*K, S, E] per layer: stacked
  with a leading [L] when the layers are scanned, tuples of L arrays otherwise (a local layer's
  with R <= S slots, its ring). Made by `init_cache`; callers treat it as opaque (`cache_len`
  reads its length)."""
  k: Any
  v: Any


# A cache array's first axis is batch and kv head in one, B*K (b major), split as both are.
SE_NAMES = ((axes.BATCH, axes.ACT_KV_HEADS), axes.LENGTH, None)  # [B*K,S,E]: values, 16-bit keys
ES_NAMES = ((axes.BATCH, axes.ACT_KV_HEADS), None, axes.LENGTH)  # [B*K,E,S]: f32 keys

_MATVEC_ROWS = 4  # decode query rows per kv head up to which CPU scores run as matvecs


def keys_transposed(dtype) -> bool:
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


def write_cache(cache_kv, k, v, cache_index, slots: int | None = None):
  """One layer's (keys, values) with the chunk's k/v [B,T,K,E] written at slot cache_index.

  slots: the cache's logical length. A layer whose arrays are shorter is a local layer's ring
  (`init_cache`): slot i lives at i mod R, and a chunk longer than the ring keeps its last R."""
  ck, cv = cache_kv
  r = cv.shape[1]
  if slots is not None and r < slots:
    return _write_ring(ck, cv, k, v, cache_index, r)
  # [B,T,K,E] -> [B*K,T,E], the cache's row layout
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])
  if keys_transposed(ck.dtype):
    ck = axes.constrain(_write(ck, heads_first(k).transpose(0, 2, 1), cache_index, 2), ES_NAMES)
  else:
    ck = axes.constrain(_write(ck, heads_first(k), cache_index, 1), SE_NAMES)
  cv = axes.constrain(_write(cv, heads_first(v), cache_index, 1), SE_NAMES)
  return ck, cv


RING_SLACK = 15  # a ring holds window + 15 slots: decode chunks of up to 16 tokens fit


def ring_len(cfg: ModelConfig, i: int, length: int) -> int:
  """Slots of layer i's cache: a local layer of an unscanned model with a global layer beside it
  keeps only its window (a ring of window + RING_SLACK slots), every other layer all `length`.
  A scanned stack shares one shape; a model of local layers only keeps full caches, so the
  longest layer always gives the cache's logical length (`cache_len`)."""
  if cfg.scan_layers or not cfg.is_sliding(i) or all(map(cfg.is_sliding, range(cfg.n_layers))):
    return length
  return min(length, cfg.sliding_window + RING_SLACK)


def _write_ring(ck, cv, k, v, cache_index, r: int):
  """write_cache into a ring of r slots."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])
  t = k.shape[1]
  if isinstance(cache_index, int):  # a prefill (static index): its last r tokens rolled in place
    keep = min(t, r)
    k, v = k[:, t - keep:], v[:, t - keep:]
    first = cache_index + t - keep
    if keep == r:  # the ring filled whole: slot first + i goes to (first + i) mod r
      k, v = (jnp.roll(x, first % r, axis=1) for x in (k, v))
      first = 0
    elif first + keep > r:
      raise ValueError(f"a chunk at slot {cache_index} wraps a partly filled ring of {r} slots")
    return write_cache((ck, cv), k, v, first)
  if t == 1:  # a decode step: one slot, written in place
    return write_cache((ck, cv), k, v, cache_index % r)
  if t > r:
    raise ValueError(f"a decode chunk of {t} tokens does not fit a ring of {r} slots")
  idx = (cache_index + jnp.arange(t)) % r
  nk, nv = heads_first(k).astype(ck.dtype), heads_first(v).astype(cv.dtype)
  ck = ck.at[:, :, idx].set(nk.transpose(0, 2, 1)) if keys_transposed(ck.dtype) else \
      ck.at[:, idx].set(nk)
  cv = cv.at[:, idx].set(nv)
  return (axes.constrain(ck, ES_NAMES if keys_transposed(ck.dtype) else SE_NAMES),
          axes.constrain(cv, SE_NAMES))


def ring_view(mask, cache_index, t: int, r: int):
  """A ring's [B,1,T,R] mask: ring slot j holds the latest cache slot a = j (mod R) written so
  far (through cache_index + t - 1), where `mask` [B,1,T,S] says whether a query sees it."""
  last = cache_index + t - 1
  a = last - (last - jnp.arange(r)) % r
  return jnp.take(mask, jnp.maximum(a, 0), axis=-1) & (a >= 0)


def decode_attention(q, ck, cv, mask, *, dtype, scale: float, softcap: float = 0.0):
  """The T new queries q [B,T,H,E] over one layer's heads-first cache (keys/values as `KVCache`
  lays them out, the new slots already written), mask [B,1,T,S] (a local layer's window
  included; [B,1,T,R] over a ring, `ring_view`) -> [B,T,H,E].

  A local layer whose cache is a ring reads just the ring. One whose cache is full length (a
  scanned stack, a model of local layers only) reads it all and masks what lies behind its
  window: cutting the window out with a dynamic slice was slower on CPU, not faster (XLA kept the
  unwritten cache alive beside the in-place write, two copies of the whole cache a step)."""
  b, t, h, e = q.shape
  kh = ck.shape[0] // b
  g = h // kh
  keys = "nes" if keys_transposed(ck.dtype) else "nse"
  s = cv.shape[1]
  # Query head h uses kv head h // G (the GQA grouping of HF and dot_product_attention).
  # The T queries of a kv head share one [T*G, S] score matrix, so each dot is a plain
  # batched matmul over the cache as it lies (no transpose of the cache).
  # A cache narrower than the compute dtype (bf16 under f32) is read as it lies: the query
  # and the probabilities are rounded to its dtype and the dots accumulate in f32, so no
  # widened copy of the cache is made each step (the error is that of the cache's rounding).
  rd = ck.dtype if jnp.finfo(ck.dtype).bits < jnp.finfo(dtype).bits else dtype
  qg = q.reshape(b, t, kh, g, e).transpose(0, 2, 1, 3, 4).reshape(b * kh, t * g, e)
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
  scores = _capped(per_row(score, qg) * scale, softcap)
  m = jnp.broadcast_to(mask[:, :, :, None], (b, kh, t, g, s)).reshape(b * kh, t * g, s)
  scores = jnp.where(m, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(rd)
  value = lambda p: jnp.einsum("nqs,nse->nqe", p, cv.astype(rd),
                               preferred_element_type=jnp.float32)
  out = per_row(value, probs).astype(dtype)
  return out.reshape(b, kh, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)


def cache_len(cache: KVCache) -> int:
  """The number of slots of a cache from `init_cache` (its global layers'; local rings hold
  fewer)."""
  return max(v.shape[-2] for v in jax.tree.leaves(cache.v))


def grow_cache(cache: KVCache, length: int, cfg: ModelConfig | None = None) -> KVCache:
  """The same cache with `length` slots (>= its own): the new slots, at the end, are zeros. A
  local layer's ring (cfg given) grows only up to its size: until it reaches it, slot i sits at
  i, which is i mod R."""
  def grow(x, axis, names, to):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return axes.constrain(jnp.pad(x, pad), (None,) * (x.ndim - 3) + names)

  def grow_kv(ks, vs, to):
    k = grow(ks, -1, ES_NAMES, to) if keys_transposed(ks.dtype) else grow(ks, -2, SE_NAMES, to)
    return k, grow(vs, -2, SE_NAMES, to)
  if isinstance(cache.v, (tuple, list)):
    sizes = [ring_len(cfg, i, length) if cfg is not None else length
             for i in range(len(cache.v))]
    pairs = [grow_kv(k, v, to) for k, v, to in zip(cache.k, cache.v, sizes)]
    return KVCache(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
  return KVCache(*grow_kv(cache.k, cache.v, length))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """A zeroed KV cache of `length` slots (a local layer's ring fewer, `ring_len`), in the compute
  dtype unless told otherwise."""
  dt = dtype or cfg.dtype
  n, e = batch * cfg.n_kv_heads, cfg.head_dim

  def keys(s):
    return ((n, e, s), ES_NAMES) if keys_transposed(dt) else ((n, s, e), SE_NAMES)
  if cfg.scan_layers:
    zeros = lambda shape, names: axes.constrain(jnp.zeros((cfg.n_layers,) + shape, dt),
                                                (None,) + names)
    return KVCache(zeros(*keys(length)), zeros((n, length, e), SE_NAMES))
  zeros = lambda shape, names: axes.constrain(jnp.zeros(shape, dt), names)
  sizes = [ring_len(cfg, i, length) for i in range(cfg.n_layers)]
  return KVCache(tuple(zeros(*keys(s)) for s in sizes),
                 tuple(zeros((n, s, e), SE_NAMES) for s in sizes))
