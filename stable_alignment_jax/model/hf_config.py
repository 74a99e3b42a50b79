"""Hugging Face `config.json` <-> ModelConfig for every family we load: what we read, and what we
refuse naming the file and field.

Families (model_type -> architecture): llama, mistral (a window shorter than the context makes
every layer sliding), qwen2 (Qwen2 / Qwen2.5: q/k/v biases), qwen3 (per-head q/k norms), gemma2
and gemma3_text (Gemma 2 and Gemma 3's text model). A family is a set of `ModelConfig` fields
(`_FAMILY`); `hf_family` reads the set back for export.

transformers 5 writes RoPE as `rope_parameters` {rope_type, rope_theta, factor, ...} (Gemma 3: one
such mapping per layer type); older files say `rope_scaling` {type | rope_type, factor, ...} beside
a top-level `rope_theta` (Gemma 3: and `rope_local_base_freq`). Both are read.
"""

import dataclasses
import json
import os

from stable_alignment_jax.model.presets import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_GEMMA = dict(norm_offset=1.0, post_norms=True, mlp_act="gelu_tanh", embed_scale=True)
# The fields a family sets beside the shapes (the rest are read from the file).
_FAMILY = {"llama": {}, "mistral": {}, "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True),
           "gemma2": _GEMMA, "gemma3_text": dict(_GEMMA, qk_norm=True)}
# transformers' defaults where a file may leave the field out.
_GEMMA_DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256, tie_word_embeddings=True,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)
_DEFAULTS = {"gemma2": dict(_GEMMA_DEFAULTS, sliding_window=4096),
             "gemma3_text": dict(_GEMMA_DEFAULTS, sliding_window=4096, rope_theta=1e6)}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


class CheckpointError(ValueError):
  """A Hugging Face checkpoint directory that cannot be read as one of our families."""


def config_from_hf(config_json: dict, path: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a HF `config.json` dict; anything we do not implement raises.

  overrides: ModelConfig fields that are ours to choose (dtype, param_dtype, remat, ...).
  """
  model_type = config_json.get("model_type")
  c = {**_DEFAULTS.get(model_type, {}), **config_json}

  def bad(field, why):
    return CheckpointError(f"{path}: field {field!r} = {config_json.get(field)!r}: {why}")

  if model_type == "gemma3":
    raise bad("model_type", "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not "
                            "supported; only its text model, model_type 'gemma3_text'")
  if model_type not in _ARCHITECTURES:
    raise bad("model_type", "unsupported architecture; supported: " + ", ".join(
        f"{a} ({t!r})" for t, a in _ARCHITECTURES.items()))
  archs = c.get("architectures") or []
  if archs and archs != [_ARCHITECTURES[model_type]]:
    raise bad("architectures", f"model_type {model_type!r} must be "
                               f"[{_ARCHITECTURES[model_type]!r}]")
  for field in ("attention_bias", "mlp_bias"):
    if c.get(field, False):
      raise bad(field, "biases are not supported (beyond Qwen2's fixed q/k/v biases)")
  gemma = model_type.startswith("gemma")
  act_field = "hidden_activation" if gemma else "hidden_act"
  if c.get(act_field, "silu") != ("gelu_pytorch_tanh" if gemma else "silu"):
    raise bad(act_field, "only SwiGLU with silu (GeGLU with gelu_pytorch_tanh for Gemma) is "
                         "supported")
  if c.get("use_bidirectional_attention"):
    raise bad("use_bidirectional_attention", "only causal attention is supported")
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
    if not isinstance(c.get(field), int) or c[field] <= 0:
      raise bad(field, "missing or not a positive integer")
  heads, dim, n_layers = c["num_attention_heads"], c["hidden_size"], c["num_hidden_layers"]
  head_dim = c.get("head_dim")
  if head_dim is None and dim % heads:
    raise bad("num_attention_heads", f"does not divide hidden_size={dim} and no head_dim is given")
  if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
    raise bad("head_dim", "not a positive integer")
  max_len = c.get("max_position_embeddings") or 2048
  window, layer_types = _sliding(c, model_type, n_layers, max_len, bad)
  fields = dict(
      vocab_size=c["vocab_size"], dim=dim, n_layers=n_layers, n_heads=heads,
      n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim or dim // heads,
      ffn_dim=c["intermediate_size"], max_seq_len=max_len,
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),  # transformers' default for all
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      sliding_window=window, layer_types=layer_types, **_FAMILY[model_type])
  if gemma:
    fields.update(query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
                  attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                  final_softcap=float(c.get("final_logit_softcapping") or 0.0))
  if model_type == "gemma3_text":
    fields.update(_gemma3_rope(c, bad))
  else:
    fields.update(_rope_fields(c, bad))
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e


def _sliding(c: dict, model_type: str, n_layers: int, max_len: int, bad) -> tuple[int, tuple]:
  """(window, layer types) as transformers derives them; a window that covers the whole context
  is full attention (no layer needs the window's mask)."""
  window = c.get("sliding_window")
  if model_type == "llama" or (model_type in ("qwen2", "qwen3")
                               and not c.get("use_sliding_window", False)):
    window = None  # transformers' LLaMA has no window, Qwen's is off unless switched on
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise bad("sliding_window", "not a positive integer or null")
  if window is None or window >= max_len:
    return 0, ()
  types = c.get("layer_types")
  if types is None:
    if model_type == "gemma2":
      types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    elif model_type == "gemma3_text":
      pattern = c.get("sliding_window_pattern", 6)
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(n_layers)]
    elif model_type in ("qwen2", "qwen3"):
      first = c.get("max_window_layers", 28)
      types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    else:
      types = ["sliding_attention"] * n_layers
  if (not isinstance(types, list) or len(types) != n_layers
      or any(t not in _LAYER_TYPES for t in types)):
    raise bad("layer_types", f"expected {n_layers} entries of {sorted(_LAYER_TYPES)}")
  types = tuple(_LAYER_TYPES[t] for t in types)
  return (window, types) if "sliding" in types else (0, ())


def _gemma3_rope(c: dict, bad) -> dict:
  """Gemma 3's two RoPEs: the global layers' (scaled: linear x8 on the 4B and up) and the local
  layers' plain base. transformers 5 keys `rope_parameters` by layer type; older files give
  rope_theta + rope_scaling for the global ones and `rope_local_base_freq`."""
  params = c.get("rope_parameters")
  if isinstance(params, dict) and "full_attention" in params:
    local = params.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
      raise bad("rope_parameters", "the sliding layers' rope_type must be 'default'")
    out = _rope_fields(dict(rope_parameters=params["full_attention"]), bad)
    return dict(out, rope_local_theta=float(local.get("rope_theta", 10000.0)))
  return dict(_rope_fields(dict(c, rope_theta=c.get("rope_theta", 1e6)), bad),
              rope_local_theta=float(c.get("rope_local_base_freq", 10000.0)))


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


def hf_family(cfg: ModelConfig) -> str:
  """The HF model_type whose architecture computes `cfg` (`config_to_hf` checks that it does)."""
  if cfg.norm_offset:
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias:
    return "qwen2"
  return "mistral" if cfg.any_sliding else "llama"


def _rope_json(cfg: ModelConfig) -> dict:
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return rope


def config_to_hf(cfg: ModelConfig, dtype: str, bos_id: int = 1, eos_id: int | list = 2) -> dict:
  """The `config.json` transformers needs to build this family's model for these weights."""
  model_type = hf_family(cfg)
  rope = _rope_json(cfg)
  # transformers >= 5 reads rope_parameters; older releases rope_theta + rope_scaling.
  scaling = None if cfg.rope_type == "default" else \
      {k: v for k, v in rope.items() if k != "rope_theta"}
  out = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": scaling,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
      "use_cache": True,
  }
  if model_type == "llama":
    return _checked(cfg, out)
  hf_types = {v: k for k, v in _LAYER_TYPES.items()}
  types = [hf_types["sliding" if cfg.is_sliding(i) else "full"] for i in range(cfg.n_layers)]
  out["sliding_window"] = cfg.sliding_window or None
  if model_type in ("qwen2", "qwen3"):
    out.update(use_sliding_window=cfg.any_sliding, layer_types=types,
               max_window_layers=types.index("sliding_attention") if cfg.any_sliding
               else cfg.n_layers)
    del out["mlp_bias"]
  if model_type.startswith("gemma"):
    del out["hidden_act"], out["mlp_bias"]
    out.update(hidden_activation="gelu_pytorch_tanh", layer_types=types,
               query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
               attn_logit_softcapping=cfg.attn_softcap or None,
               final_logit_softcapping=cfg.final_softcap or None)
  if model_type == "gemma3_text":
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
               rope_local_base_freq=local["rope_theta"])
  return _checked(cfg, out)


def _int_if_whole(x: float):
  return int(x) if float(x).is_integer() else x  # transformers' config checks want an int


_OURS = ("dtype", "param_dtype", "remat", "scan_layers")  # not the checkpoint's to say


def _checked(cfg: ModelConfig, out: dict) -> dict:
  """`out`, once it reads back as `cfg`: a mix of fields no HF family has is refused, not
  exported as some other model."""
  back = config_from_hf(out, **{k: getattr(cfg, k) for k in _OURS})
  diff = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
          if getattr(back, f.name) != getattr(cfg, f.name)]
  if diff:
    raise ValueError(f"no Hugging Face architecture computes this model: as "
                     f"{out['architectures'][0]} it would lose {', '.join(diff)}")
  return out


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
