"""LoRA adapters on the attention and MLP projections, and the frozen (optionally quantized) base.

For a projection W whose einsum layout is (in dims..., out dims...) (model/llama.py), an adapter
is A (in dims..., r), B (r, out dims...) and the layer computes
  y = x.W + (alpha / r) * ((x.A).B)
without ever forming W + delta (Hu et al. 2021; PEFT's scaling alpha / r, not rsLoRA). A is drawn
like PEFT's (kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
prod(in dims)) and B is zero, so a fresh adapter leaves the model's outputs exactly as they were.
Adapters are kept in f32 whatever the base's dtype (they are the trained master weights).

A model with adapters is the ordinary `Llama` with an `Adapter` module set beside each targeted
weight (`attn.lora_wq` ...), which `llama.py` adds to that projection's output; with
`quantize`, each projection weight of the base is replaced by a `quant.Quantized` that reads like
the Param (`w[...]`). The state then splits in two by variable type:
  adapters: the nnx.LoRAParam leaves (trained, saved in the run directory)
  frozen:   everything else, the base (rebuilt from checkpoint.init_from on resume, not saved)
and `Graphs.base` is the same model without the adapters: merged with the frozen tree alone it
is the base with adapters off (DPO's and PPO's reference, no second copy of the weights).

Under scan_layers every adapter array has the leading [L] axis of its weight. Logical names are
the weight's, with the rank axis replicated (None).
"""

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stable_alignment_jax.model import llama, quant
from stable_alignment_jax.model.presets import ModelConfig

# HF/PEFT module name -> (our submodule, our weight, number of its leading `in` dims).
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "wq", 1), "k_proj": ("attn", "wk", 1), "v_proj": ("attn", "wv", 1),
    "o_proj": ("attn", "wo", 2), "gate_proj": ("mlp", "w_gate", 1), "up_proj": ("mlp", "w_up", 1),
    "down_proj": ("mlp", "w_down", 1)}
PREFIX = "lora_"  # attribute of a weight's adapter: attn.lora_wq


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  quantize: str = ""
  quant_block: int = 64

  def __post_init__(self):
    bad = [t for t in self.targets if t not in TARGETS]
    if bad:
      raise ValueError(f"lora.targets: unknown {bad}; known: {list(TARGETS)}")
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank}: give 0 (off) or a positive rank")
    if self.quantize and self.quantize not in quant.KINDS:
      raise ValueError(f"lora.quantize={self.quantize!r}: give '' or one of {quant.KINDS}")
    if self.quantize and not self.rank:
      raise ValueError(f"lora.quantize={self.quantize!r} needs lora.rank > 0 (a quantized base "
                       "with nothing trainable)")
    if self.rank and not self.targets:
      raise ValueError("lora.rank > 0 with no lora.targets: nothing would train")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout}: give a rate in [0, 1)")
    if self.dropout:
      raise NotImplementedError(f"lora.dropout={self.dropout}: dropout on the LoRA path is not "
                                "implemented; use 0.0")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, block: Any) -> "LoraConfig":
    """From a config's `lora` block (ConfigDict or dict; None or missing: off)."""
    if block is None:
      return cls()
    d = dict(block)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise KeyError(f"config.lora: unknown keys {unknown}")
    if "targets" in d:
      t = d["targets"]
      d["targets"] = tuple(t.split(",")) if isinstance(t, str) else tuple(t)
    return cls(**d)


class Adapter(nnx.Module):
  """A [*lead, *in, r] and B [*lead, r, *out] of one weight; call: x [..., *in] -> delta."""

  def __init__(self, param: nnx.Param, *, rank: int, scale: float, n_in: int, n_lead: int,
               key: jax.Array):
    names = tuple(param.get_metadata().get("out_sharding") or (None,) * param.ndim)
    shape = param.shape
    lead, ins, outs = shape[:n_lead], shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]
    bound = 1.0 / math.sqrt(math.prod(ins))
    a = jax.random.uniform(key, lead + ins + (rank,), jnp.float32, -bound, bound)
    self.a = nnx.LoRAParam(a, out_sharding=names[:n_lead + n_in] + (None,),
                           eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros(lead + (rank,) + outs, jnp.float32),
                           out_sharding=names[:n_lead] + (None,) + names[n_lead + n_in:],
                           eager_sharding=False)
    self.scale, self.n_in = scale, n_in

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    h = jnp.tensordot(x, self.a[...].astype(dtype), axes=self.n_in)
    return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)


def _layers(model: llama.Llama) -> list:
  return [model.layers] if model.cfg.scan_layers else list(model.layers)


def attach(model: llama.Llama, lcfg: LoraConfig, key: jax.Array) -> llama.Llama:
  """Sets an Adapter beside each targeted weight of every layer (in place); returns the model."""
  n_lead = 1 if model.cfg.scan_layers else 0
  for i, layer in enumerate(_layers(model)):
    for j, hf in enumerate(lcfg.targets):
      mod, attr, n_in = TARGETS[hf]
      sub = getattr(layer, mod)
      setattr(sub, PREFIX + attr, Adapter(
          getattr(sub, attr), rank=lcfg.rank, scale=lcfg.scale, n_in=n_in, n_lead=n_lead,
          key=jax.random.fold_in(jax.random.fold_in(key, i), j)))
  return model


def quantize(model: llama.Llama, lcfg: LoraConfig) -> llama.Llama:
  """Replaces every projection weight of every layer by its `quant.Quantized` (in place)."""
  if not lcfg.quantize:
    return model
  n_lead = 1 if model.cfg.scan_layers else 0
  for layer in _layers(model):
    for mod, attr, _ in TARGETS.values():
      sub = getattr(layer, mod)
      setattr(sub, attr, quant.Quantized(getattr(sub, attr), kind=lcfg.quantize,
                                         block=lcfg.quant_block, dtype=model.cfg.dtype,
                                         n_lead=n_lead))
  return model


def lora_model(cfg: ModelConfig, lcfg: LoraConfig, seed: int = 0, params=None) -> llama.Llama:
  """The LoRA model: a Llama (random of `seed`, or holding the plain state `params`) with
  adapters drawn from `seed` and, with lcfg.quantize, its base quantized."""
  model = llama.Llama(cfg, rngs=nnx.Rngs(seed))
  if params is not None:
    nnx.update(model, params)
  attach(model, lcfg, jax.random.fold_in(jax.random.key(seed), 0x10A))
  return quantize(model, lcfg)


def base_model(cfg: ModelConfig, lcfg: LoraConfig, params=None) -> llama.Llama:
  """The base as a LoRA run holds it: the Llama (with `params`), quantized when asked."""
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  if params is not None:
    nnx.update(model, params)
  return quantize(model, lcfg)


@dataclasses.dataclass(frozen=True)
class Graphs:
  """full: graphdef of the model with adapters (merge with adapters and frozen); base: the
  same without adapters (merge with frozen alone: adapters off); adapters / frozen: abstract
  states (restore targets, sharding names)."""
  full: Any
  base: Any
  adapters: Any
  frozen: Any


def graphs(cfg: ModelConfig, lcfg: LoraConfig) -> Graphs:
  full, adapters, frozen = nnx.split(nnx.eval_shape(lambda: lora_model(cfg, lcfg)),
                                     nnx.LoRAParam, ...)
  base, frozen_b = nnx.split(nnx.eval_shape(lambda: base_model(cfg, lcfg)))
  assert jax.tree.structure(frozen) == jax.tree.structure(frozen_b), "frozen trees differ"
  return Graphs(full, base, adapters, frozen)


def abstract_adapters(cfg: ModelConfig, lcfg: LoraConfig):
  """(graphdef of the LoRA model, abstract adapters state): what restores a run's `params`."""
  g = graphs(cfg, lcfg)
  return g.full, g.adapters


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, seed: int = 0):
  """Fresh adapters (A drawn from `seed`, B zero). Jitted with out_shardings by trainers: the
  random base built on the way is dead code to XLA and never materialises."""
  return nnx.split(lora_model(cfg, lcfg, seed), nnx.LoRAParam, ...)[1]


def frozen_base(cfg: ModelConfig, lcfg: LoraConfig, params):
  """The frozen tree of a LoRA run from the plain base state `params` (quantized if asked;
  without quantization the very same arrays)."""
  if not lcfg.quantize:
    return params
  return nnx.split(base_model(cfg, lcfg, params))[1]


def merged_model(g: Graphs, adapters, frozen) -> llama.Llama:
  """The model with adapters on (for a training forward)."""
  return nnx.merge(g.full, adapters, frozen)


def reference_model(g: Graphs, frozen) -> llama.Llama:
  """The base with adapters off."""
  return nnx.merge(g.base, frozen)


# --- export side: adapters per layer, merged weights ------------------------------------------

def _pure(tree) -> dict:
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


_BY_ATTR = {(mod, attr): hf for hf, (mod, attr, _) in TARGETS.items()}


def adapter_items(adapters, cfg: ModelConfig | None = None
                  ) -> Iterator[tuple[int, str, Any, Any]]:
  """(layer index, HF name, A [*in, r], B [r, *out]) of every adapter, layer by layer in
  TARGETS order. The layout (scanned or one entry per layer) is read from the tree; `cfg`,
  when given, must agree with it."""
  layers = _pure(adapters)["layers"]
  unscanned = all(isinstance(k, int) or str(k).isdigit() for k in layers)
  if cfg is not None and cfg.scan_layers == unscanned:
    raise ValueError(f"adapters are {'un' if unscanned else ''}scanned but the model config "
                     f"says scan_layers={cfg.scan_layers}")
  if unscanned:
    per_layer = [layers[k] for k in sorted(layers, key=int)]
    n = len(per_layer)
  else:
    n = next(layers[mod][PREFIX + attr]["a"].shape[0] for (mod, attr) in _BY_ATTR
             if PREFIX + attr in layers[mod])
  for i in range(n):
    for (mod, attr), hf in _BY_ATTR.items():
      sub = per_layer[i][mod] if unscanned else layers[mod]
      if PREFIX + attr not in sub:
        continue
      a, b = sub[PREFIX + attr]["a"], sub[PREFIX + attr]["b"]
      yield i, hf, (a if unscanned else a[i]), (b if unscanned else b[i])


def delta(a, b, n_in: int, scale: float, n_lead: int = 0):
  """scale * A.B in f32: [*lead, *in, *out]."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  lead, ins, outs = a.shape[:n_lead], a.shape[n_lead:n_lead + n_in], b.shape[n_lead + 1:]
  r = a.shape[-1]
  m = jnp.matmul(a.reshape(*lead, math.prod(ins), r), b.reshape(*lead, r, math.prod(outs)))
  return (m * scale).reshape(*lead, *ins, *outs)


def merge(base_state, adapters, lcfg: LoraConfig, cfg: ModelConfig | None = None):
  """A plain model state (the tree of a non-LoRA Llama) with W + (alpha/r) A.B in every
  targeted weight, computed in f32 and cast to W's dtype. base_state: the plain base, or the
  frozen tree of a quantized run (then `cfg` is needed: the weights come back dequantized in
  cfg.param_dtype)."""
  pure = jax.tree.map(lambda x: x, _pure(base_state))  # a new tree: the input stays as it is
  ad = _pure(adapters)["layers"]
  layers = pure["layers"]
  scanned = not all(isinstance(k, int) or str(k).isdigit() for k in layers)
  groups = [(layers, ad)] if scanned else [(layers[k], ad[k]) for k in layers]
  for base_layer, ad_layer in groups:
    for mod, attr, n_in in TARGETS.values():
      w = base_layer[mod][attr]
      if isinstance(w, dict):  # a quantized weight: {"q", "scale"}
        if cfg is None:
          raise ValueError("merge of a quantized base needs the model config")
        shape = _weight_shape(cfg, mod, attr)
        w = quant.dequantize_blocks(w["q"], w["scale"], lcfg.quantize, shape, cfg.param_dtype)
      if PREFIX + attr in ad_layer[mod]:
        a, b = ad_layer[mod][PREFIX + attr]["a"], ad_layer[mod][PREFIX + attr]["b"]
        d = delta(a, b, n_in, lcfg.scale, n_lead=1 if scanned else 0)
        w = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
      base_layer[mod][attr] = w
  if isinstance(base_state, nnx.State) or cfg is not None:
    if cfg is None:
      target = jax.tree.map(lambda x: x, base_state)
    else:
      target = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))[1]
    nnx.replace_by_pure_dict(target, pure)
    return target
  return pure


def _weight_shape(cfg: ModelConfig, mod: str, attr: str) -> tuple[int, ...]:
  d, h, k, e, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  return {"wq": (d, h, e), "wk": (d, k, e), "wv": (d, k, e), "wo": (h, e, d),
          "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}[attr]
