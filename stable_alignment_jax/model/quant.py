"""A frozen weight stored quantized (QLoRA's base): int8 or nf4, blockwise absmax scales.

The weight's elements, in row-major order, are cut into blocks of `block` consecutive values;
each block keeps its absmax as an f32 scale and its values as
  int8: round(127 * w / absmax)                     (symmetric, -127..127)
  nf4:  the index of the nearest of NF4's 16 levels to w / absmax, stored as uint4
        (Dettmers et al. 2023: the levels are quantiles of a standard normal, rescaled to
        [-1, 1], with an exact zero; a weight drawn ~N(0, s) fills them about equally).
`Quantized` stands where the Param was (`attn.wq` ...) and reads like it: `w[...]` gives the
dequantized weight in the model's compute dtype, so the model's einsums need no change, and under
`scan_layers` the stacked q/scale are sliced per layer by the scan, so a layer is dequantized when
it runs (and again in the backward pass under remat), never the whole model at once.

Sharding: the blocks run over the flattened weight, so the block axis takes the logical name of
the weight's first (non-layer) axis: splitting the blocks evenly over devices splits that first
axis in the same contiguous pieces. Other axes' splits (e.g. tensor-parallel heads) are not kept.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("int8", "nf4")

# The 16 NF4 levels of the QLoRA paper (bitsandbytes' table), ascending; tests recompute them
# from normal quantiles.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Nearest level by binary search over the midpoints: no [..., 16] distance tensor (an 8B
# model's MLP weight would need GBs for it).
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


class QuantizedWeight(nnx.Variable):
  """The stored codes and scales of a frozen weight (never trained: not an nnx.Param)."""


def quantize_blocks(w: jax.Array, kind: str, block: int, n_lead: int = 0):
  """(codes [*lead, N/block, block], scales f32 [*lead, N/block]) of w [*lead, *shape],
  N = prod(shape)."""
  if kind not in KINDS:
    raise ValueError(f"lora.quantize={kind!r}: give one of {KINDS} (or '' for none)")
  lead, shape = w.shape[:n_lead], w.shape[n_lead:]
  n = math.prod(shape)
  if block < 1 or n % block:
    raise ValueError(f"lora.quant_block={block} does not divide a weight of shape {shape} "
                     f"({n} values)")
  x = w.astype(jnp.float32).reshape(*lead, n // block, block)
  absmax = jnp.max(jnp.abs(x), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]  # an all-zero block stays zero
  if kind == "int8":
    q = jnp.clip(jnp.round(x / safe * 127.0), -127, 127).astype(jnp.int8)
    return q, absmax / 127.0
  q = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x / safe).astype(jnp.uint4)
  return q, absmax


def dequantize_blocks(q: jax.Array, scale: jax.Array, kind: str, shape, dtype) -> jax.Array:
  """The weight [*lead, *shape] in `dtype` (the products taken in f32)."""
  if kind == "int8":
    vals = q.astype(jnp.float32)
  else:
    vals = jnp.take(jnp.asarray(NF4_LEVELS), q.astype(jnp.int32))
  w = vals * scale[..., None].astype(jnp.float32)
  return w.reshape(*q.shape[:-2], *shape).astype(dtype)


class Quantized(nnx.Module):
  """A quantized frozen weight that reads like the Param it replaces: `w[...]`."""

  def __init__(self, param: nnx.Param, *, kind: str, block: int, dtype, n_lead: int = 0):
    names = tuple(param.get_metadata().get("out_sharding") or ())
    value = param[...]
    q, scale = quantize_blocks(value, kind, block, n_lead)
    lead_names, first = names[:n_lead], (names[n_lead] if len(names) > n_lead else None)
    self.q = QuantizedWeight(q, out_sharding=lead_names + (first, None), eager_sharding=False)
    self.scale = QuantizedWeight(scale, out_sharding=lead_names + (first,),
                                 eager_sharding=False)
    self.kind, self.shape, self.dtype = kind, tuple(value.shape[n_lead:]), dtype
    self.param_dtype = value.dtype

  def dequantize(self, dtype=None) -> jax.Array:
    return dequantize_blocks(self.q[...], self.scale[...], self.kind, self.shape,
                             dtype or self.dtype)

  def __getitem__(self, index):
    w = self.dequantize()
    return w if index is Ellipsis else w[index]
