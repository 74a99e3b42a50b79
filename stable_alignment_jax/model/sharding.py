"""The device mesh and the ONE table of logical-axis rules.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters, gradients and
optimizer state sharded), `tensor` (heads / MLP / vocab split across devices). Every parameter and
activation name of `model/axes.py` has exactly one rule here; nothing else in the project names a
mesh axis. A 7B model on a v5p-64 is e.g. `mesh.fsdp=-1` (all 32 chips FSDP); a 70B would add
`tensor`.
"""

import contextlib
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from stable_alignment_jax.model import axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis

# logical name -> mesh axis (or tuple of axes, or None = replicated). One entry per name.
RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    (axes.VOCAB, "tensor"),
    (axes.VOCAB_IN, None),  # a gather from a row-split table makes XLA replicate it
    (axes.EMBED, "fsdp"),
    (axes.HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.MLP, "tensor"),
    (axes.NORM, None),
    (axes.LAYERS, None),  # every device holds its shard of every layer (FSDP splits within)
    # activations
    (axes.BATCH, BATCH_AXES),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_KV_HEADS, "tensor"),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
)
_RULE_MAP = dict(RULES)
assert len(_RULE_MAP) == len(RULES), "a logical name appears twice in RULES"
assert set(_RULE_MAP) == set(axes.PARAM_NAMES + axes.ACTIVATION_NAMES), "RULES must cover axes.py"


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves `{data, fsdp, tensor}` sizes where one may be -1 (= fill the remaining devices)."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise KeyError(f"unknown mesh axes {unknown}; known: {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(shape) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if fills:
    if n_devices % known:
      raise ValueError(f"{n_devices} devices cannot be split as {dict(zip(MESH_AXES, shape))}")
    shape[fills[0]] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"have {n_devices}")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """A mesh over all devices of all hosts (or `devices`), e.g. make_mesh({'fsdp': -1})."""
  if devices is None:
    shape = mesh_shape(dict(sizes), jax.device_count())
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  shape = mesh_shape(dict(sizes), len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names, shape=None, mesh: Mesh | None = None, what: str = "") -> P:
  """Maps logical names to a PartitionSpec; with a mesh and shape, checks divisibility."""
  missing = [n for n in names if n is not None and n not in _RULE_MAP]
  if missing:
    raise KeyError(f"{what}: no sharding rule for logical axes {missing}; known: {sorted(_RULE_MAP)}")
  spec = [None if n is None else _RULE_MAP[n] for n in names]
  if mesh is not None and shape is not None:
    for dim, (size, ax) in enumerate(zip(shape, spec)):
      if ax is None:
        continue
      n = math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax))
      if size % n:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(shape)} ({names[dim]} -> {ax}) is "
                         f"not divisible by {n} devices")
  return P(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh + rule table in context: what jitted model code needs to pin its activations."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(RULES):
    yield


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedShardings for an (abstract) NNX state from the logical names stored on each Variable.

  Scalars and variables without names (e.g. an optimizer step count) are replicated.
  """
  def one(path, var):
    is_var = isinstance(var, nnx.Variable)
    names = var.get_metadata().get("out_sharding") if is_var else None
    value = var.get_value() if is_var else var
    if not names or not getattr(value, "ndim", 0):
      sh = NamedSharding(mesh, P())
    else:
      what = "/".join(str(p) for p in path)
      sh = NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, what))
    # Same tree structure as the state (Variables keep their metadata), so the result serves
    # jit's in/out_shardings and lines up leaf for leaf with the state when flattened.
    return var.replace(value=sh) if is_var else sh
  return jax.tree.map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dim split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def build_sharded(make_module, mesh: Mesh):
  """Creates an NNX module with every weight born sharded on `mesh`.

  The module is first traced abstractly (no memory), shardings are derived from the logical
  names, then initialisation runs under `jax.jit(out_shardings=...)`, so each device only ever
  materialises its own shard: a 7B model never exists whole on one host.
  Returns (graphdef, state).
  """
  abstract = nnx.eval_shape(make_module)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  def init():
    return nnx.split(make_module())[1]

  with activate(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state


def per_device_bytes(tree) -> dict[Any, int]:
  """Bytes each device holds for the arrays in `tree` (addressable shards on this host)."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def total_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def global_batch(local: dict, mesh) -> dict:
  """Process-local numpy batch -> global jax arrays split over the data-parallel axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local.items()}
