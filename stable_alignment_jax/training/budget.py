"""What a training step holds in memory, and the micro-batching that fits it in a budget.

`optim.accum_steps = 0` (the default) lets `auto_accum_steps` choose the number of micro-batches
a step is split into (`train.train_step` scans them and sums the gradients: the same update).
It is the fewest micro-batches whose saved activations fit the budget of the devices in use:
  * on an accelerator, what HBM leaves after params, optimizer moments, gradients and a
    reference model (90% of the device's `bytes_limit`, minus those): big matmuls, and no
    out-of-memory at the first step;
  * on CPU, a quarter of the last-level cache: the backward pass re-reads each layer's saved
    activations, and from DRAM XLA's CPU backend stalls on them (benchmarks/train_step.py, B=4
    prompts x K=3 x T=256 on the bench preset: 1.9 s a step whole, 1.5 s in 4 micro-batches).
When nothing fits, the most micro-batches the batch allows (one prompt each). The plan's
activation figures (`activation_bytes`) are the planner's, so the two agree by construction.
"""

import glob
import math

import jax
import numpy as np
from flax import nnx

from stable_alignment_jax.training import losses
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama, logprobs
from stable_alignment_jax.model.presets import ModelConfig
from stable_alignment_jax.training.optim import make_optimizer

HBM_FRACTION = 0.9  # of a device's memory a step may plan to use (XLA needs the rest)
CPU_CACHE_FRACTION = 0.25  # of the last-level cache one micro-batch's activations may fill
CPU_CACHE_FALLBACK = 32 * 2**20  # when the cache size cannot be read


def leaf_bytes_per_device(tree, mesh_sizes: dict[str, int]) -> tuple[int, int]:
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


def method_of(c) -> str:
  """Which trainer a config is for (config.method: preference | reward | ppo)."""
  return c.get("method", "preference")


# Bits per stored element of a quantized frozen base (lora.quantize), beside one float32 absmax
# scale per lora.quant_block elements.
QUANT_BITS = {"int8": 8, "nf4": 4}
SCALE_BYTES = 4

# LoRA targets (HF/PEFT names) -> (our sub-path in a layer, number of leading `in` dims of the
# einsum layout; the rest are `out` dims): the adapters' shapes follow (in..., r), (r, out...).
LORA_TARGETS = {"q_proj": (("attn", "wq"), 1), "k_proj": (("attn", "wk"), 1),
                "v_proj": (("attn", "wv"), 1), "o_proj": (("attn", "wo"), 2),
                "gate_proj": (("mlp", "w_gate"), 1), "up_proj": (("mlp", "w_up"), 1),
                "down_proj": (("mlp", "w_down"), 1)}


def lora_block(c) -> dict | None:
  """config.lora as a dict when it turns LoRA on (rank > 0), else None (full fine-tuning)."""
  block = c.get("lora")
  if not block or int(block.get("rank", 0)) <= 0:
    return None
  return dict(block)


def _target_shapes(cfg: ModelConfig, targets) -> dict[str, tuple[tuple[int, ...], int]]:
  """{target: (the shape of ONE layer's weight, leading in-dims)} for the configured targets."""
  d, f, h, k, e = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  shapes = {"q_proj": (d, h, e), "k_proj": (d, k, e), "v_proj": (d, k, e), "o_proj": (h, e, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  unknown = sorted(set(targets) - set(shapes))
  if unknown:
    raise ValueError(f"config.lora.targets: unknown {unknown}; choose from {sorted(shapes)}")
  return {t: (shapes[t], LORA_TARGETS[t][1]) for t in targets}


def lora_adapter_shapes(cfg: ModelConfig, rank: int, targets) -> dict:
  """Abstract adapters, float32, stacked over layers: {target: {"a": [L, in..., r],
  "b": [L, r, out...]}} (the shapes of the LoRA spec; the planner counts them unsharded)."""
  out = {}
  for t, (shape, n_in) in _target_shapes(cfg, targets).items():
    out[t] = {"a": jax.ShapeDtypeStruct((cfg.n_layers, *shape[:n_in], rank), np.float32),
              "b": jax.ShapeDtypeStruct((cfg.n_layers, rank, *shape[n_in:]), np.float32)}
  return out


def frozen_base_bytes(abstract, cfg: ModelConfig, lora: dict, mesh_sizes: dict[str, int]) -> int:
  """Per-device bytes of the frozen base under LoRA: every weight as in the full model, except
  that with lora.quantize every projection of every layer (all seven, whatever lora.targets
  says: model/lora.py quantizes the whole base) holds `QUANT_BITS` bits an element plus a
  float32 scale per lora.quant_block elements, sharded as the weight it replaces. nf4 codes are
  counted packed, two a byte (jnp.uint4; a backend that keeps a byte per code holds the int8
  figure)."""
  per_dev, _ = leaf_bytes_per_device(abstract, mesh_sizes)
  quant = lora.get("quantize", "")
  if not quant:
    return per_dev
  if quant not in QUANT_BITS:
    raise ValueError(f"config.lora.quantize={quant!r}: expected '', 'int8' or 'nf4'")
  block = int(lora.get("quant_block", 64))
  projections = tuple("/".join(sub) for sub, _ in LORA_TARGETS.values())
  for path, var in jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if not name.startswith("layers/") or not name.endswith(projections):
      continue
    one, _ = leaf_bytes_per_device({"w": var}, mesh_sizes)
    elems = one // np.dtype(var.get_value().dtype).itemsize
    per_dev += elems * QUANT_BITS[quant] // 8 + -(-elems // block) * SCALE_BYTES - one
  return per_dev


def state_bytes(c, mesh_sizes: dict[str, int]) -> dict[str, int]:
  """Per-device bytes of the training state (traced abstractly, nothing allocated), and the
  total parameter bytes of the model under `params_total`.

  By config.method: preference (the stages and baselines; a reference copy when the loss needs
  one), reward (the trunk + a scalar head) and ppo (the policy + its value head, pi_ref, and the
  reward model it scores with when reward.model names one, counted as the policy's size).
  With config.lora.rank > 0 the trainable params are the adapters (+ the head), float32 and
  counted unsharded (they are small: an upper bound), the base is frozen (`frozen_base`,
  quantized with lora.quantize) and there is no reference copy: the reference is the base with
  the adapters off. Optimizer moments and gradients follow the trainable params."""
  cfg = ModelConfig.from_dict(c.model)
  method = method_of(c)
  abstract = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))[1]
  model_dev, model_total = leaf_bytes_per_device(abstract, mesh_sizes)
  head = ({"w": jax.ShapeDtypeStruct((cfg.dim,), np.float32),
           "b": jax.ShapeDtypeStruct((), np.float32)} if method in ("reward", "ppo") else {})
  lora = lora_block(c)
  if lora:
    trainable = {"adapters": lora_adapter_shapes(
        cfg, int(lora["rank"]), lora.get("targets", tuple(LORA_TARGETS))), "head": head}
    frozen = frozen_base_bytes(abstract, cfg, lora, mesh_sizes)
  else:
    trainable, frozen = {"model": abstract, "head": head}, 0
  tx, _ = make_optimizer(c.optim, 1000)
  params_dev, _ = leaf_bytes_per_device(trainable, mesh_sizes)
  opt_dev, _ = leaf_bytes_per_device(jax.eval_shape(tx.init, trainable), mesh_sizes)
  if method == "preference":
    reference = losses.needs_reference(c.loss.name)
  else:
    reference = method == "ppo"  # pi_ref
  reward_model = 0
  if method == "ppo" and c.get("reward", {}).get("model"):
    reward_model = model_dev + leaf_bytes_per_device(head, mesh_sizes)[0]
  # Gradients live in the trainable params' dtype and sharding.
  return {"params": params_dev, "frozen_base": frozen, "optimizer": opt_dev,
          "gradients": params_dev, "reference": model_dev if reference and not lora else 0,
          "reward_model": reward_model, "params_total": model_total}


def step_shape(c) -> tuple[int, int, int]:
  """(prompts, sequences per prompt, tokens per sequence) of one optimizer step's batch: the
  data block's [B, K, T] for the preference and reward trainers, one PPO minibatch of
  prompt + response for ppo."""
  if method_of(c) == "ppo":
    return c.ppo.minibatch, 1, c.ppo.max_prompt_len + c.ppo.max_new_tokens
  return c.data.batch_size, c.data.num_responses, c.data.max_len


def activation_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int,
                     logprob_chunk: int = 0) -> dict[str, int]:
  """Bytes kept for the backward pass by one device holding `rows` sequences of length `seq`.

  Counts, per token and layer, what the remat policy saves (model/llama.py): `full` keeps the
  layer input; `dots` also keeps every projection output (q, k, v, o, gate, up, down; attention
  scores are recomputed); `none` keeps all intermediates incl. the [H, T] attention weights.
  Head/MLP-sized tensors are split over `tensor`. Logits are f32 and split over vocab: the
  whole [rows, seq, V] and their gradient, or with `logprob_chunk` (train.logprob_chunk) those
  of one chunk of positions, the only ones that exist at a time (model.logprobs).
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
  positions = logprobs.chunk_plan(seq, logprob_chunk)[1] if logprob_chunk > 0 else seq
  logits = 2 * rows * positions * cfg.vocab_size / tensor * 4  # logits + their gradient, f32
  return {"layers": int(layers), "logits": int(logits)}


def valid_accum_steps(batch_size: int, rows_per_prompt: int, dp: int) -> list[int]:
  """Micro-batch counts a step can take, fewest first: each divides the prompts, and each
  micro-batch's sequences split evenly over the data-parallel devices."""
  return [a for a in range(1, batch_size + 1)
          if batch_size % a == 0 and (batch_size // a * rows_per_prompt) % dp == 0]


def accum_for_budget(c, budget: float, mesh_sizes: dict[str, int]) -> int:
  """The fewest micro-batches whose activations per device fit `budget` bytes, else the most."""
  cfg = ModelConfig.from_dict(c.model)
  dp = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
  b, k, t = step_shape(c)
  # The reward model and PPO take one micro-batch a step (their trainers refuse more).
  options = valid_accum_steps(b, k, dp)[:1 if method_of(c) != "preference" else None]
  if not options:
    raise ValueError(f"{b} prompts x {k} responses a step do not split over "
                     f"{dp} data-parallel devices")
  for a in options:
    act = activation_bytes(cfg, b // a * k // dp, t,
                           mesh_sizes.get("tensor", 1), c.train.get("logprob_chunk", 0))
    if sum(act.values()) <= budget:
      return a
  return options[-1]


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
  """The largest CPU cache of this host (Linux sysfs), else CPU_CACHE_FALLBACK."""
  sizes = []
  for path in glob.glob(f"{root}/index*/size"):
    try:
      text = open(path).read().strip().upper()
    except OSError:
      continue
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    if digits.isdigit():
      sizes.append(int(digits) * scale)
  return max(sizes) if sizes else CPU_CACHE_FALLBACK


def device_budget(c, mesh_sizes: dict[str, int]) -> tuple[float, str]:
  """Bytes one micro-batch's activations may take on the devices in use, and where from."""
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    llc = last_level_cache_bytes()
    return (CPU_CACHE_FRACTION * llc,
            f"{CPU_CACHE_FRACTION:.0%} of the {llc / 2**20:.0f} MiB CPU cache")
  stats = dev.memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return float("inf"), f"{dev.device_kind}: memory size unknown, one micro-batch"
  state = state_bytes(c, mesh_sizes)
  held = sum(v for k, v in state.items() if k != "params_total")
  return (HBM_FRACTION * limit - held,
          f"{HBM_FRACTION:.0%} of {limit / 2**30:.1f} GiB {dev.device_kind} minus "
          f"{held / 2**30:.2f} GiB of state")


def auto_accum_steps(c, mesh) -> tuple[int, str]:
  """optim.accum_steps when it is set (> 0); when 0, the choice for this mesh and its budget."""
  if c.optim.accum_steps > 0:
    return c.optim.accum_steps, "set by optim.accum_steps"
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  budget, where = device_budget(c, sizes)
  return accum_for_budget(c, budget, sizes), f"auto: activations within {where}"

