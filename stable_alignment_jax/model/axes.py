"""Logical axis names of every parameter and activation of the model.

The model only ever speaks these names. `sharding.py` beside it owns the one table that
maps them to mesh axes and installs it (with the mesh) around jitted code; the model never names a
mesh axis. Weights and activations use different names (MaxText's convention), so e.g. the
embedding dimension can be FSDP-sharded in the weights while replicated in activations.
"""

import jax
from flax.core import spmd

# Parameters.
VOCAB = "vocab"
VOCAB_IN = "vocab_in"  # rows of the input embedding table: gathered, so not split
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"
LAYERS = "layers"  # the leading axis of scanned (stacked) layer weights

# Activations (and the KV cache, which is an activation kept across steps).
BATCH = "act_batch"
LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

PARAM_NAMES = (VOCAB, VOCAB_IN, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, NORM, LAYERS)
ACTIVATION_NAMES = (BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB)


def constrain(x: jax.Array, names: tuple[str | tuple[str, ...] | None, ...]) -> jax.Array:
  """Pins an activation's sharding by logical names, under the active mesh and rule table.

  Without a mesh in context (plain single-device use) this is the identity. With a mesh, every
  name must have a rule: a name the table does not know raises instead of silently replicating.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = dict(spmd.get_logical_axis_rules())
  if len(names) != x.ndim:
    raise ValueError(f"logical names {names} do not match an activation of shape {x.shape}")
  flat = [n for name in names for n in (name if isinstance(name, tuple) else (name,))]
  missing = [n for n in flat if n is not None and n not in rules]
  if missing:
    raise KeyError(f"no sharding rule for logical axes {missing}; known: {sorted(rules)}")

  def mesh_axes(name):  # a tuple of logical names: one axis, split by all their mesh axes
    if not isinstance(name, tuple):
      return rules[name] if name is not None else None
    parts = [rules[n] for n in name]
    out = tuple(a for p in parts if p is not None for a in (p if isinstance(p, tuple) else (p,)))
    return out or None
  spec = jax.sharding.PartitionSpec(*(mesh_axes(n) for n in names))
  return jax.lax.with_sharding_constraint(x, spec)
