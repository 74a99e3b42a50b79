"""Hugging Face `config.json` <-> ModelConfig for the LLaMA family (LlamaForCausalLM,
MistralForCausalLM): what we read, and what we refuse naming the file and field.

transformers 5 writes RoPE as `rope_parameters` {rope_type, rope_theta, factor, ...}; older files
say `rope_scaling` {type | rope_type, factor, ...} beside a top-level `rope_theta`. Both are read.
"""

import json
import os

from stable_alignment_jax.model.presets import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


class CheckpointError(ValueError):
  """A Hugging Face checkpoint directory that cannot be read as our LLaMA."""


def config_from_hf(config_json: dict, path: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a HF LLaMA/Mistral `config.json` dict; anything we do not implement raises.

  overrides: ModelConfig fields that are ours to choose (dtype, param_dtype, remat, ...).
  """
  c = config_json

  def bad(field, why):
    return CheckpointError(f"{path}: field {field!r} = {c.get(field)!r}: {why}")

  model_type = c.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise bad("model_type", "unsupported architecture; only LlamaForCausalLM (model_type "
                            "'llama') and MistralForCausalLM ('mistral') are supported")
  archs = c.get("architectures") or []
  if archs and archs != [_ARCHITECTURES[model_type]]:
    raise bad("architectures", f"model_type {model_type!r} must be "
                               f"[{_ARCHITECTURES[model_type]!r}]")
  for field in ("attention_bias", "mlp_bias"):
    if c.get(field, False):
      raise bad(field, "biases are not supported (LLaMA has none)")
  if c.get("hidden_act", "silu") != "silu":
    raise bad("hidden_act", "only SwiGLU with silu is supported")
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
    if not isinstance(c.get(field), int) or c[field] <= 0:
      raise bad(field, "missing or not a positive integer")
  heads, dim = c["num_attention_heads"], c["hidden_size"]
  head_dim = c.get("head_dim")
  if head_dim is None and dim % heads:
    raise bad("num_attention_heads", f"does not divide hidden_size={dim} and no head_dim is given")
  if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
    raise bad("head_dim", "not a positive integer")
  max_len = c.get("max_position_embeddings") or 2048
  window = c.get("sliding_window")
  if window is not None and window < max_len:
    raise bad("sliding_window", f"sliding-window attention is not supported; only a window of "
                                f"null or >= max_position_embeddings={max_len} (full attention)")
  fields = dict(
      vocab_size=c["vocab_size"], dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
      n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim or dim // heads,
      ffn_dim=c["intermediate_size"], max_seq_len=max_len,
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),  # transformers' default for both
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), **_rope_fields(c, bad))
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e


def _rope_fields(c: dict, bad) -> dict:
  """RoPE from transformers 5's `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
  field = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
  params = c.get(field) or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise bad(field, "expected one mapping of RoPE settings (per-layer-type RoPE is unsupported)")
  theta = params.get("rope_theta") or c.get("rope_theta") or 10000.0
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return dict(rope_theta=float(theta))
  if kind not in ("linear", "llama3"):
    raise bad(field, f"rope_type {kind!r} is not supported; only default, linear and llama3")
  if params.get("attention_factor") not in (None, 1, 1.0):
    raise bad(field, "attention_factor is not supported")
  need = ["factor"] + (["low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"] if kind == "llama3" else [])
  missing = [k for k in need if params.get(k) is None]
  if missing:
    raise bad(field, f"rope_type {kind!r} needs {missing}")
  out = dict(rope_theta=float(theta), rope_type=kind, rope_factor=float(params["factor"]))
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_len=int(params["original_max_position_embeddings"]))
  return out


def checkpoint_dtype(config_json: dict) -> str:
  """The dtype the checkpoint was saved in (`torch_dtype`, or transformers 5's `dtype`)."""
  return str(config_json.get("torch_dtype") or config_json.get("dtype") or "bfloat16")


def config_to_hf(cfg: ModelConfig, dtype: str, bos_id: int = 1, eos_id: int | list = 2) -> dict:
  """The `config.json` transformers needs to build LlamaForCausalLM for these weights."""
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  # transformers >= 5 reads rope_parameters; older releases rope_theta + rope_scaling.
  scaling = None if cfg.rope_type == "default" else \
      {k: v for k, v in rope.items() if k != "rope_theta"}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": scaling,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
      "use_cache": True,
  }


def read_hf_json(directory: str) -> tuple[dict, str]:
  """(config.json as a dict, its path); errors name the file."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
  with open(path) as fh:
    try:
      return json.load(fh), path
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_hf_config(directory: str, **overrides) -> ModelConfig:
  return config_from_hf(*read_hf_json(directory), **overrides)
