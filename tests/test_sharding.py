"""Mesh construction, the logical-axis rule table, born-sharded models, and 1-vs-8-device parity.

Runs on the 8 virtual CPU devices of tests/conftest.py.
"""

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import axes
from stable_alignment_jax.model.llama import Llama
from stable_alignment_jax.model.presets import preset

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


def _make_tiny(cfg):
  return lambda: Llama(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def cfg():
  return preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def one_device_state(cfg):
  """The tiny model initialised by one plain jit on the default device (no mesh involved)."""
  graphdef = nnx.graphdef(nnx.eval_shape(_make_tiny(cfg)))
  state = jax.jit(lambda: nnx.state(_make_tiny(cfg)()))()
  return graphdef, state


@pytest.fixture(scope="module")
def mesh222():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# ---------------------------------------------------------------- mesh shapes

def test_mesh_shape_fills_and_checks():
  assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({}, 1) == (1, 1, 1)
  assert sharding.mesh_shape({"fsdp": -1}, 1) == (1, 1, 1)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="8 devices cannot be split"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    sharding.mesh_shape({"data": 2, "tensor": 2}, 8)
  with pytest.raises(ValueError, match="positive or -1"):
    sharding.mesh_shape({"data": 0, "fsdp": -1}, 8)
  with pytest.raises(KeyError, match=r"unknown mesh axes \['model'\]"):
    sharding.mesh_shape({"model": 2, "fsdp": -1}, 8)


def test_make_mesh_uses_all_devices_and_names_axes():
  mesh = sharding.make_mesh({"fsdp": -1})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


# ---------------------------------------------------------------- the rule table

def test_every_param_has_named_axes_with_rules(cfg):
  rules = dict(sharding.RULES)
  state = nnx.state(nnx.eval_shape(_make_tiny(cfg)))
  flat = nnx.to_flat_state(state)
  assert len(flat) == 3 + 9 * (1 if cfg.scan_layers else cfg.n_layers)
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{path} has no logical axis names"
    assert len(names) == var.get_value().ndim, f"{path}: names {names} vs shape {var.shape}"
    for n in names:
      assert n in axes.PARAM_NAMES and n in rules, f"{path}: {n!r} is not a parameter rule"
  for n in axes.ACTIVATION_NAMES:
    assert n in rules, n


def test_resolved_specs_match_golden():
  # The generator sits beside the golden file; it computes the specs from the live code.
  spec = importlib.util.spec_from_file_location("make_tiny_sharding",
                                                GOLDEN_DIR / "make_tiny_sharding.py")
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  golden = json.loads((GOLDEN_DIR / "tiny_sharding.json").read_text())
  current = gen.current_specs()
  assert current["mesh"] == golden["mesh"]
  assert current["activations"] == golden["activations"], (
      "activation rules changed; if deliberate, rerun tests/golden/make_tiny_sharding.py")
  assert sorted(current["params"]) == sorted(golden["params"])
  for key, entry in golden["params"].items():
    assert current["params"][key] == entry, (
        f"{key}: sharding changed from {entry} to {current['params'][key]}; if deliberate, "
        "rerun tests/golden/make_tiny_sharding.py")


def test_golden_is_what_the_rules_say():
  """Cross-check the golden file against the sharding policy (FSDP over embed, tensor over
  heads/mlp/vocab), independently of the generator."""
  golden = json.loads((GOLDEN_DIR / "tiny_sharding.json").read_text())
  policy = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
            "vocab": "tensor", "vocab_in": None, "head_dim": None, "norm": None, "layers": None}
  for key, entry in golden["params"].items():
    assert entry["spec"] == [policy[n] for n in entry["names"]], key
  assert golden["activations"]["act_batch"] == ["data", "fsdp"]


def test_logical_to_spec_errors(mesh222):
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec((None, "act_batch")) == P(None, ("data", "fsdp"))
  with pytest.raises(KeyError, match=r"layers/0/mlp/w_up: no sharding rule for logical axes "
                     r"\['ffn'\]"):
    sharding.logical_to_spec(("embed", "ffn"), what="layers/0/mlp/w_up")
  with pytest.raises(ValueError, match=r"layers/0/mlp/w_up: dim 1 of shape \(64, 175\) "
                     r"\(mlp -> tensor\) is not divisible by 2 devices"):
    sharding.logical_to_spec(("embed", "mlp"), (64, 175), mesh222, what="layers/0/mlp/w_up")
  # Batch over data x fsdp = 4 devices.
  with pytest.raises(ValueError, match="not divisible by 4 devices"):
    sharding.logical_to_spec(("act_batch", None), (6, 3), mesh222, what="tokens")
  sharding.logical_to_spec(("act_batch", None), (8, 3), mesh222, what="tokens")


def test_build_sharded_names_the_parameter_that_does_not_divide(cfg, mesh222):
  bad = preset("tiny", dtype="float32", ffn_dim=175)
  # The first MLP weight met names itself (path, dim, shape, rule), whichever it is.
  with pytest.raises(ValueError, match=r"layers.*mlp.*w_(down|gate|up).*: dim [12] of shape "
                     r"\(2, (175, 64|64, 175)\) \(mlp -> tensor\) is not divisible by 2 "
                     r"devices"):
    sharding.build_sharded(_make_tiny(bad), mesh222)  # scanned: [L, ...] weights
  unrolled = preset("tiny", dtype="float32", ffn_dim=175, scan_layers=False)
  with pytest.raises(ValueError, match=r"layers.*0.*mlp.*w_(down|gate|up).*: dim [01] of shape "
                     r"\((175, 64|64, 175)\) \(mlp -> tensor\) is not divisible by 2 devices"):
    sharding.build_sharded(_make_tiny(unrolled), mesh222)


def test_constrain_under_mesh_and_without(mesh222):
  x = jnp.ones((8, 4))
  assert axes.constrain(x, ("no_such_axis", None)) is x  # no mesh: the identity
  with sharding.activate(mesh222):
    with pytest.raises(KeyError, match=r"no sharding rule for logical axes \['no_such_axis'\]"):
      jax.jit(lambda a: axes.constrain(a, ("no_such_axis", None)))(x)
    with pytest.raises(ValueError, match="do not match an activation of shape"):
      jax.jit(lambda a: axes.constrain(a, (axes.BATCH,)))(x)
    y = jax.jit(lambda a: axes.constrain(a * 2, (axes.BATCH, axes.ACT_MLP)))(x)
  np.testing.assert_array_equal(y, 2 * np.ones((8, 4)))
  assert y.sharding.spec == P(("data", "fsdp"), "tensor")


def test_a_joined_axis_is_split_as_its_parts(mesh222):
  """The KV cache's [B*K, ...] axis (b major) named (batch, kv heads): each device holds exactly
  the rows it holds of the [B, K, ...] array split by both names."""
  x = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3)
  with sharding.activate(mesh222):
    split = jax.jit(lambda a: axes.constrain(a, (axes.BATCH, axes.ACT_KV_HEADS, None)))(x)
    joined = jax.jit(lambda a: axes.constrain(a.reshape(8, 3), (
        (axes.BATCH, axes.ACT_KV_HEADS), None)))(x)
  assert joined.sharding.spec[0] == ("data", "fsdp", "tensor")
  by_device = {sh.device: np.asarray(sh.data) for sh in split.addressable_shards}
  for sh in joined.addressable_shards:
    np.testing.assert_array_equal(np.asarray(sh.data), by_device[sh.device].reshape(-1, 3))


# ---------------------------------------------------------------- born-sharded models

def test_fsdp8_shards_every_matrix_and_divides_the_bytes(cfg, one_device_state):
  mesh = sharding.make_mesh({"fsdp": -1})
  _, state = sharding.build_sharded(_make_tiny(cfg), mesh)
  # Born sharded = the same weights as the plain initialisation, just spread out.
  for (path, a), b in zip(jax.tree.leaves_with_path(state),
                          jax.tree.leaves(one_device_state[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=str(path))
  replicated_bytes = 0
  for path, leaf in jax.tree.leaves_with_path(state):
    assert len(leaf.sharding.device_set) == 8, path
    if "norm" not in str(path):  # every matrix (stacked or not) is split
      assert not leaf.sharding.is_fully_replicated, f"{path} is left replicated"
    else:
      assert leaf.sharding.is_fully_replicated, path
      replicated_bytes += leaf.nbytes  # the RMSNorm scales: 5 x 64 floats
  assert replicated_bytes == (2 * cfg.n_layers + 1) * cfg.dim * 4
  total = sharding.total_bytes(state)
  assert total == cfg.num_params() * 4
  per_device = sharding.per_device_bytes(state)
  assert len(per_device) == 8
  for dev, nbytes in per_device.items():
    assert total / 8 <= nbytes <= total / 8 + replicated_bytes, (dev, nbytes, total)


def test_one_device_mesh_works(cfg, one_device_state):
  mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  graphdef, state = sharding.build_sharded(_make_tiny(cfg), mesh)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))
  with sharding.activate(mesh):
    logits = _logits(graphdef, state, tokens)
  ref = _logits(*one_device_state, tokens)
  np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 1 vs 8 devices

@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)[0]


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, state, tokens):
  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return jax.value_and_grad(loss)(state)


def test_loss_and_grads_match_on_1_and_8_devices(cfg, one_device_state, mesh222):
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 33)).astype(np.int32)
  graphdef, state1 = one_device_state
  loss1, grads1 = _loss_and_grads(graphdef, state1, jnp.asarray(tokens))
  assert len(jax.tree.leaves(grads1)[0].sharding.device_set) == 1

  graphdef8, state8 = sharding.build_sharded(_make_tiny(cfg), mesh222)
  for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with sharding.activate(mesh222):
    tokens8 = jax.device_put(tokens, sharding.batch_sharding(mesh222, 2))
    loss8, grads8 = _loss_and_grads(graphdef8, state8, tokens8)
  assert len(jax.tree.leaves(grads8)[0].sharding.device_set) == 8

  # Random tokens under a random model: the loss is near log(V), a real cross-entropy.
  assert abs(float(loss1) - np.log(cfg.vocab_size)) < 1.0
  np.testing.assert_allclose(float(loss8), float(loss1), atol=1e-5, rtol=0)
  flat1 = jax.tree.leaves_with_path(grads1)
  flat8 = jax.tree.leaves(grads8)
  assert len(flat1) == len(flat8) == 3 + 9 * (1 if cfg.scan_layers else cfg.n_layers)
  for (path, g1), g8 in zip(flat1, flat8):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(g).max()) for _, g in flat1) > 1e-3
