"""Memory and step-time planner: will a stage config fit, and how fast can it go, on a pod?

  python -m stable_alignment_jax.plan --config=configs/stage3.py --hardware=v5p-64
  python -m stable_alignment_jax.plan --config=configs/stage3.py --hardware=h100x8 \
      --mesh=data=1,fsdp=-1,tensor=1

No device is touched: the model is traced abstractly (`nnx.eval_shape`), so a 7B or 70B plan runs
on a laptop. Per-device bytes come from the same logical-axis rule table the trainer uses, so
parameter and optimizer figures are exact (a test checks them against a real 8-device state);
activation bytes and step time are estimates whose assumptions are printed with them.
"""

import math
import re
import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from stable_alignment_jax import losses, sharding
from stable_alignment_jax.flops import CHIPS, Chip, step_flops
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import ModelConfig
from stable_alignment_jax.optim import make_optimizer


ACHIEVABLE = 0.6  # fraction of peak the matmuls of a well-sharded step reach (assumption)


def parse_hardware(spec: str) -> tuple[Chip, int]:
  """`v5p-64` (TPU slice: TensorCores, 2 per v4/v5p chip) or `h100x8` (8 GPUs) -> (chip, n)."""
  m = re.fullmatch(r"(v4|v5p)-(\d+)", spec) or re.fullmatch(r"(h100)x(\d+)", spec)
  if not m:
    raise ValueError(f"--hardware={spec!r}: expected e.g. v4-32, v5p-64 or h100x8")
  n = int(m.group(2))
  if m.group(1) in ("v4", "v5p"):
    if n % 2:
      raise ValueError(f"--hardware={spec!r}: a {m.group(1)} slice counts 2 cores per chip")
    n //= 2
  return CHIPS[m.group(1)], n


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = int(v)
  return out


def _leaf_bytes_per_device(tree, mesh_sizes: dict[str, int]) -> tuple[int, int]:
  """(bytes on one device, total bytes) of an abstract NNX state under the rule table."""
  per_dev = total = 0
  for path, var in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if not hasattr(value, "shape"):
      continue
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    total += nbytes
    div = 1
    if names and value.ndim:
      what = jax.tree_util.keystr(path, simple=True, separator="/")
      for size, ax in zip(value.shape, sharding.logical_to_spec(names, what=what)):
        axes_ = () if ax is None else (ax,) if isinstance(ax, str) else ax
        n = math.prod(mesh_sizes[a] for a in axes_)
        if size % n:
          raise ValueError(f"{what}: dim {size} is not divisible by {n} devices ({ax})")
        div *= n
    per_dev += nbytes // div
  return per_dev, total


def activation_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int,
                     logprob_chunk: int = 0) -> dict[str, int]:
  """Bytes kept for the backward pass by one device holding `rows` sequences of length `seq`.

  Counts, per token and layer, what the remat policy saves (model/llama.py): `full` keeps the
  layer input; `dots` also keeps every projection output (q, k, v, o, gate, up, down; attention
  scores are recomputed); `none` keeps all intermediates incl. the [H, T] attention weights.
  Head/MLP-sized tensors are split over `tensor`. Logits are f32 and split over vocab: the
  whole [rows, seq, V] and their gradient, or with `logprob_chunk` (train.logprob_chunk) those
  of one chunk of positions, the only ones that exist at a time (losses.target_logprobs).
  """
  b = np.dtype(cfg.dtype).itemsize
  d, f, h = cfg.dim, cfg.ffn_dim, cfg.n_heads
  kvd = cfg.n_kv_heads * cfg.head_dim
  proj = (d + 2 * kvd + 2 * f) / tensor + 2 * d  # q,k,v,gate,up split; o, down outputs full
  per_token_layer = {
      "full": d,
      "dots": d + proj,
      "none": 4 * d + proj + (d + kvd) / tensor + 2 * h * seq / tensor + f / tensor,
  }[cfg.remat] * b
  tokens = rows * seq
  layers = cfg.n_layers * tokens * per_token_layer
  if cfg.remat != "none":  # while one layer's backward runs, its intermediates exist in full
    layers += tokens * (4 * d + proj + 2 * h * seq / tensor) * b
  positions = losses.chunk_plan(seq, logprob_chunk)[1] if logprob_chunk > 0 else seq
  logits = 2 * rows * positions * cfg.vocab_size / tensor * 4  # logits + their gradient, f32
  return {"layers": int(layers), "logits": int(logits)}


def plan(c, chip: Chip, n_devices: int, mesh_sizes: dict[str, int] | None = None) -> dict:
  """Every figure of the printed plan, as a dict (tests compare it to measured bytes)."""
  cfg = ModelConfig.from_dict(c.model)
  shape = sharding.mesh_shape(mesh_sizes or dict(c.mesh), n_devices)
  sizes = dict(zip(sharding.MESH_AXES, shape))
  abstract = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))[1]
  tx, _ = make_optimizer(c.optim, 1000)
  opt = jax.eval_shape(tx.init, abstract)
  params_dev, params_total = _leaf_bytes_per_device(abstract, sizes)
  opt_dev, _ = _leaf_bytes_per_device(opt, sizes)
  reference = losses.needs_reference(c.loss.name)
  dp = sizes["data"] * sizes["fsdp"]
  rows_total = c.data.batch_size * c.data.num_responses
  micro_rows = rows_total // max(c.optim.accum_steps, 1)
  if micro_rows % dp:
    raise ValueError(f"{micro_rows} sequences per micro-batch do not split over {dp} "
                     f"data-parallel devices")
  act = activation_bytes(cfg, micro_rows // dp, c.data.max_len, sizes["tensor"],
                         c.train.get("logprob_chunk", 0))
  grads_dev = params_dev  # gradients live in param_dtype with the params' sharding
  ref_dev = params_dev if reference else 0
  mem = {"params": params_dev, "optimizer": opt_dev, "gradients": grads_dev,
         "reference": ref_dev, **{f"activations_{k}": v for k, v in act.items()}}
  mem["total"] = sum(mem.values())

  tokens = rows_total * c.data.max_len
  model_flops, hw_flops = step_flops(cfg, tokens, c.data.max_len, reference=reference)
  compute = hw_flops / n_devices / (chip.peak_bf16 * ACHIEVABLE)
  # FSDP: all-gather bf16 weights for forward and backward, reduce-scatter the gradients.
  gather = sizes["fsdp"]
  wire = (3 * params_total * 2 / np.dtype(cfg.param_dtype).itemsize * (gather - 1) / gather
          / sizes["tensor"]) if gather > 1 else 0.0
  comm = wire / chip.link
  step = max(compute, comm)  # communication overlaps compute when the program is well scheduled
  return {"chip": chip.name, "devices": n_devices, "mesh": sizes, "num_params": cfg.num_params(),
          "bytes_per_device": mem, "hbm": chip.hbm, "fits": mem["total"] < 0.9 * chip.hbm,
          "tokens_per_step": tokens, "model_flops": model_flops, "hardware_flops": hw_flops,
          "compute_s": compute, "comm_s": comm, "step_s": step,
          "mfu": model_flops / n_devices / chip.peak_bf16 / step,
          "tokens_per_s": tokens / step}


def format_plan(p: dict) -> str:
  gib = lambda x: f"{x / 2**30:8.2f} GiB"
  lines = [f"{p['chip']} x{p['devices']}  mesh {p['mesh']}  model {p['num_params'] / 1e9:.2f}B "
           f"params", "per device:"]
  lines += [f"  {k:<20}{gib(v)}" for k, v in p["bytes_per_device"].items()]
  lines.append(f"  of HBM {gib(p['hbm'])}: {'fits' if p['fits'] else 'DOES NOT FIT (>90%)'}")
  lines.append(f"step: {p['tokens_per_step']} tokens, {p['model_flops'] / 1e15:.2f} PFLOP model "
               f"({p['hardware_flops'] / 1e15:.2f} executed with recompute)")
  lines.append(f"  compute {p['compute_s'] * 1e3:.1f} ms at {ACHIEVABLE:.0%} of peak, FSDP "
               f"collectives {p['comm_s'] * 1e3:.1f} ms -> step {p['step_s'] * 1e3:.1f} ms, "
               f"MFU {p['mfu']:.1%}, {p['tokens_per_s']:,.0f} tokens/s")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  for hw in _HARDWARE.value:
    chip, n = parse_hardware(hw)
    print(format_plan(plan(_CONFIG.value, chip, n, parse_mesh(_MESH.value) or None)))
    print()
  sys.stdout.flush()


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG, _HARDWARE, _MESH
  _CONFIG = config_flags.DEFINE_config_file("config", None, "stage config, e.g. configs/stage3.py",
                                            lock_config=True)
  _HARDWARE = flags.DEFINE_list("hardware", ["v4-64", "v5p-64", "h100x8"],
                                "slices to plan for: v4-N / v5p-N (TensorCores) or h100xN")
  _MESH = flags.DEFINE_string("mesh", "", "mesh override, e.g. data=1,fsdp=-1,tensor=1")
  app.run(main)


if __name__ == "__main__":
  cli()
