"""LoRA adapters in and out of PEFT's format: `adapter_config.json` + `adapter_model.safetensors`,
the directory `peft.PeftModel.from_pretrained(hf_base, DIR)` loads onto the HF base model.

Our adapter of a weight W with einsum layout (in dims..., out dims...) is A [in..., r] and
B [r, out...], and the layer computes x.W + (alpha / r) (x.A).B. PEFT's Linear holds
lora_A.weight [r, in] and lora_B.weight [out, r] (torch's [out, in] convention) and computes the
same (alpha / r) B_t A_t x with its default scaling (not rsLoRA). So:
  lora_A.weight = A reshaped to [prod(in), r], transposed
  lora_B.weight = B reshaped to [r, prod(out)], transposed
Flattening keeps our axis order, which is HF's: q_proj's out (h, e) is h-major, as its [H*E, D]
weight; o_proj's in (h, e) likewise (model/convert.py's layouts).

This module knows only the format: which adapters a run holds, and its config, come from the
caller as `(layer, hf_name, A, B)` items (model/lora.py's `adapter_items`).
"""

import json
import os
from typing import Iterable

import numpy as np
from safetensors.numpy import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The HF module each target sits in (LlamaDecoderLayer and the families that share its names).
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_PREFIX = "base_model.model.model.layers"


def tensor_name(layer: int, target: str, which: str) -> str:
  """PEFT's saved name (adapter name stripped) of lora_A / lora_B of one target in one layer."""
  if target not in _MODULE:
    raise ValueError(f"LoRA target {target!r}: expected one of {sorted(_MODULE)}")
  return f"{_PREFIX}.{layer}.{_MODULE[target]}.{target}.{which}.weight"


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lora_A.weight [r, prod(in)], lora_B.weight [prod(out), r]) of our A [in..., r], B [r, out...]."""
  a, b = np.asarray(a), np.asarray(b)
  r = a.shape[-1]
  if b.shape[0] != r:
    raise ValueError(f"adapter ranks disagree: A {a.shape}, B {b.shape}")
  return a.reshape(-1, r).T, b.reshape(r, -1).T


def adapter_tensors(items: Iterable, dtype: str = "float32") -> dict[str, np.ndarray]:
  """{PEFT name: tensor} of `(layer, hf_name, A, B)` items, in `dtype`."""
  out = {}
  for layer, target, a, b in items:
    ta, tb = to_peft(a, b)
    out[tensor_name(int(layer), target, "lora_A")] = np.ascontiguousarray(ta, dtype=dtype)
    out[tensor_name(int(layer), target, "lora_B")] = np.ascontiguousarray(tb, dtype=dtype)
  if not out:
    raise ValueError("no LoRA adapters to write")
  return out


def adapter_config(*, rank: int, alpha: float, dropout: float, targets, base_model: str) -> dict:
  """PEFT's LoraConfig fields for our adapters; the others are left to PEFT's defaults, which are
  ours (no bias, no rsLoRA, no DoRA, scaling alpha / r)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
          "lora_alpha": float(alpha), "lora_dropout": float(dropout),
          "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "inference_mode": True,
          "base_model_name_or_path": base_model}


def write_adapter(directory: str, items: Iterable, *, rank: int, alpha: float, dropout: float,
                  targets, base_model: str, dtype: str = "float32") -> str:
  """Writes the adapter directory; returns its absolute path. Refuses a directory that already
  holds an adapter (an export never overwrites another)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(os.path.join(directory, ADAPTER_WEIGHTS)):
    raise FileExistsError(f"{directory}: already holds {ADAPTER_WEIGHTS}")
  tensors = adapter_tensors(items, dtype)
  wrong = sorted({n.split(".")[-3] for n in tensors} - set(targets))
  if wrong:
    raise ValueError(f"adapters on {wrong}, which lora.targets {tuple(targets)} does not name")
  for name, t in tensors.items():
    got = t.shape[0] if ".lora_A." in name else t.shape[1]
    if got != rank:
      raise ValueError(f"{name}: rank {got}, lora.rank says {rank}")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  cfg = adapter_config(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                       base_model=base_model)
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(cfg, f, indent=2)
  return directory


def read_adapter(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json, {name: tensor}) of an adapter directory."""
  with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
    cfg = json.load(f)
  return cfg, load_file(os.path.join(directory, ADAPTER_WEIGHTS))
