"""Writes tests/golden/tiny_sharding.json: the resolved PartitionSpecs of the tiny model.

Run from the project root after a deliberate change to the rule table or the model's logical
names, then review the diff of the JSON like code:

  python tests/golden/make_tiny_sharding.py

The mesh is data=2, fsdp=2, tensor=2 over 8 virtual CPU devices, so every mesh axis is in play.
"""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = pathlib.Path(__file__).with_name("tiny_sharding.json")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _spec_json(spec) -> list:
  """PartitionSpec -> JSON: null (replicated), "axis", or ["axis", ...] per dimension."""
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def current_specs() -> dict:
  """{"params": {path: {"names", "spec"}}, "activations": {name: spec}} for the tiny model."""
  from flax import nnx

  from stable_alignment_jax.model import sharding
  from stable_alignment_jax.model import axes
  from stable_alignment_jax.model.llama import Llama
  from stable_alignment_jax.model.presets import preset

  mesh = sharding.make_mesh(MESH)
  cfg = preset("tiny", dtype="float32")
  abstract_state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh)))
  params = {}
  for path, var in nnx.to_flat_state(abstract_state):
    key = "/".join(str(p) for p in path)
    params[key] = {"names": list(var.get_metadata()["out_sharding"]),
                   "spec": _spec_json(shardings[path].spec)}
  activations = {n: _spec_json(sharding.logical_to_spec((n,)))[0] for n in axes.ACTIVATION_NAMES}
  return {"mesh": MESH, "params": params, "activations": activations}


def to_json(specs: dict) -> str:
  """One line per entry, so a changed rule shows as a readable one-line diff."""
  lines = []
  for section, entries in specs.items():
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(entries.items()))
    lines.append(f" {json.dumps(section)}: {{\n{body}\n }}")
  return "{\n" + ",\n".join(lines) + "\n}\n"


def main():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  GOLDEN.write_text(to_json(current_specs()))
  print(f"wrote {GOLDEN}")


if __name__ == "__main__":
  main()
