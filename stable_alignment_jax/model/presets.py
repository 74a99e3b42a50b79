"""Model sizes: the `ModelConfig` dataclass and a table of named presets.

Pure Python (no JAX import) so config files can read it cheaply. The keys are DESIGN.md's
`model.*` config keys. `head_dim` 0 means dim / n_heads (LLaMA 1-3.1); LLaMA-3.2 and Mistral
checkpoints may give it explicitly. RoPE scaling follows `transformers`' `rope_type`s "linear"
(positions divided by `rope_factor`) and "llama3" (LLaMA-3.1's per-frequency scaling).
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  head_dim: int = 0  # 0 = dim // n_heads
  tie_embeddings: bool = False  # the LM head is the input embedding (LLaMA-3.2, SmolLM2)
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 0  # llama3: the pre-training context the scaling extends
  # Family differences, as fields (defaults: LLaMA). Qwen2: qkv_bias. Qwen3: qk_norm. Gemma 2/3:
  # norm_offset 1, post_norms, gelu_tanh, embed_scale, query_pre_attn_scalar, sliding layers;
  # Gemma 2 the soft-caps, Gemma 3 qk_norm and rope_local_theta. Mistral: sliding_window.
  qkv_bias: bool = False  # biases on the q/k/v projections (not on the output projection)
  qk_norm: bool = False  # RMSNorm over each head's query and key, head_dim wide, before RoPE
  norm_offset: float = 0.0  # every RMSNorm multiplies by (norm_offset + w), w as HF stores it
  post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add
  mlp_act: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, tanh-approximate GELU)
  embed_scale: bool = False  # input embeddings times sqrt(dim), rounded to the compute dtype
  query_pre_attn_scalar: float = 0.0  # scores scaled by its -1/2 power (0: head_dim's)
  attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) before the mask (0: off)
  final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) (0: off)
  # A sliding layer's query sees the keys less than `sliding_window` positions back (itself
  # included), as transformers' `kv_idx > q_idx - sliding_window`; 0 or no sliding layer: off.
  sliding_window: int = 0
  layer_types: tuple = ()  # "full" | "sliding" per layer; () = every layer full
  rope_local_theta: float = 0.0  # sliding layers' RoPE base, default RoPE (0: the global RoPE)
  dtype: str = "bfloat16"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the weights (and of the optimizer moments)
  remat: str = "none"  # none | full | dots: recompute policy per decoder layer
  # Layers as one stacked module run under a scan: compile time stops growing with depth.
  scan_layers: bool = True

  def __post_init__(self):
    if not self.head_dim:
      if self.dim % self.n_heads:
        raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                         "give head_dim explicitly")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected one of none, full, dots")
    if self.rope_type not in ("default", "linear", "llama3"):
      raise ValueError(f"rope_type={self.rope_type!r}; expected one of default, linear, llama3")
    if self.rope_type != "default" and self.rope_factor <= 0:
      raise ValueError(f"rope_factor={self.rope_factor} must be > 0")
    if self.rope_type == "llama3":
      if self.rope_original_max_len <= 0:
        raise ValueError("rope_type='llama3' needs rope_original_max_len > 0")
      if self.rope_high_freq_factor <= self.rope_low_freq_factor:
        raise ValueError("rope_high_freq_factor must exceed rope_low_freq_factor")
    object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a list from a config file
    if self.layer_types and len(self.layer_types) != self.n_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                       f"n_layers={self.n_layers}")
    if set(self.layer_types) - {"full", "sliding"}:
      raise ValueError(f"layer_types={self.layer_types}; each entry is 'full' or 'sliding'")
    if ("sliding" in self.layer_types) != (self.sliding_window > 0):
      raise ValueError(f"sliding_window={self.sliding_window} with layer_types="
                       f"{self.layer_types}: a window needs a 'sliding' layer and vice versa")
    if self.mlp_act not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_act={self.mlp_act!r}; expected silu or gelu_tanh")

  def is_sliding(self, i: int) -> bool:
    """Whether layer i attends within the sliding window."""
    return bool(self.layer_types) and self.layer_types[i] == "sliding"

  @property
  def any_sliding(self) -> bool:
    return "sliding" in self.layer_types

  def num_params(self) -> int:
    d, f, hd = self.dim, self.ffn_dim, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    attn += self.qkv_bias * hd * (self.n_heads + 2 * self.n_kv_heads) + self.qk_norm * 2 * hd
    layer = attn + 3 * d * f + (4 if self.post_norms else 2) * d
    embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * d
    return embeddings + self.n_layers * layer + d

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a mapping (e.g. `config.model`); unknown keys raise, naming them."""
    d = dict(d)
    d.pop("preset", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise KeyError(f"unknown model config keys {unknown}; known: {sorted(names)}")
    return cls(**d)


# Sizes from the papers' tables (LLaMA-2: Touvron et al. 2023, Table 1 / HF config.json of
# meta-llama/Llama-2-7b-hf, -13b-hf; LLaMA-3: meta-llama/Meta-Llama-3-8B config.json) and the
# published config.json files of meta-llama/Llama-3.1-8B, Llama-3.2-1B, Llama-3.2-3B and
# HuggingFaceTB/SmolLM2-135M, -360M, -1.7B.
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)
PRESETS: dict[str, dict[str, Any]] = {
    # Runs in seconds on one CPU core; GQA on (4 heads over 2 KV heads) so tests cover it.
    "tiny": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                 max_seq_len=512),
    # The shape benchmarks/train_step.py measures (vocab 8000, dim 256, 4 layers, ...).
    "bench": dict(vocab_size=8000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                  max_seq_len=1024),
    "llama2_7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_dim=11008, max_seq_len=4096),
    "llama2_13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                       ffn_dim=13824, max_seq_len=4096),
    "llama3_8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_dim=14336, max_seq_len=8192, rope_theta=500000.0),
    "llama3_1_8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        ffn_dim=14336, max_seq_len=131072, rope_factor=8.0, **_LLAMA3_ROPE),
    "llama3_2_1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, ffn_dim=8192, max_seq_len=131072, tie_embeddings=True,
                        rope_factor=32.0, **_LLAMA3_ROPE),
    "llama3_2_3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                        head_dim=128, ffn_dim=8192, max_seq_len=131072, tie_embeddings=True,
                        rope_factor=32.0, **_LLAMA3_ROPE),
    "smollm2_135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0,
                         tie_embeddings=True),
    "smollm2_360m": dict(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                         ffn_dim=2560, max_seq_len=8192, rope_theta=100000.0,
                         tie_embeddings=True),
    "smollm2_1_7b": dict(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                         ffn_dim=8192, max_seq_len=8192, rope_theta=130000.0,
                         tie_embeddings=True),
}

# The other families, from the published config.json files of Qwen/Qwen2.5-0.5B, -1.5B, -7B,
# Qwen/Qwen3-0.6B, -1.7B, -8B, google/gemma-2-2b, -9b, google/gemma-3-270m, -1b-pt and the text
# model of google/gemma-3-4b-pt.
_QWEN = dict(rope_theta=1e6, norm_eps=1e-6)
_QWEN2 = dict(_QWEN, qkv_bias=True)
_QWEN3 = dict(_QWEN, qk_norm=True, head_dim=128, max_seq_len=40960)
_GEMMA = dict(norm_offset=1.0, post_norms=True, mlp_act="gelu_tanh", embed_scale=True,
              head_dim=256, query_pre_attn_scalar=256.0, tie_embeddings=True, norm_eps=1e-6)


def _gemma2(n_layers: int, **kw) -> dict:
  """Gemma 2: local (4096) and global layers alternate, the first local; both soft-caps."""
  return dict(_GEMMA, n_layers=n_layers, vocab_size=256000, max_seq_len=8192, sliding_window=4096,
              layer_types=("sliding", "full") * (n_layers // 2), attn_softcap=50.0,
              final_softcap=30.0, **kw)


def _gemma3(n_layers: int, **kw) -> dict:
  """Gemma 3: five local layers, then one global (rope base 1e6; the local ones 1e4); q/k norms."""
  types = tuple("sliding" if (i + 1) % 6 else "full" for i in range(n_layers))
  return dict(_GEMMA, n_layers=n_layers, qk_norm=True, layer_types=types, rope_theta=1e6,
              rope_local_theta=10000.0, **kw)


PRESETS.update({
    "qwen2_5_0_5b": dict(_QWEN2, vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, ffn_dim=4864, max_seq_len=32768, tie_embeddings=True),
    "qwen2_5_1_5b": dict(_QWEN2, vocab_size=151936, dim=1536, n_layers=28, n_heads=12,
                         n_kv_heads=2, ffn_dim=8960, max_seq_len=131072, tie_embeddings=True),
    "qwen2_5_7b": dict(_QWEN2, vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, ffn_dim=18944, max_seq_len=131072),
    "qwen3_0_6b": dict(_QWEN3, vocab_size=151936, dim=1024, n_layers=28, n_heads=16,
                       n_kv_heads=8, ffn_dim=3072, tie_embeddings=True),
    "qwen3_1_7b": dict(_QWEN3, vocab_size=151936, dim=2048, n_layers=28, n_heads=16,
                       n_kv_heads=8, ffn_dim=6144, tie_embeddings=True),
    "qwen3_8b": dict(_QWEN3, vocab_size=151936, dim=4096, n_layers=36, n_heads=32,
                     n_kv_heads=8, ffn_dim=12288),
    "gemma2_2b": _gemma2(26, dim=2304, n_heads=8, n_kv_heads=4, ffn_dim=9216),
    "gemma2_9b": _gemma2(42, dim=3584, n_heads=16, n_kv_heads=8, ffn_dim=14336),
    "gemma3_270m": _gemma3(18, vocab_size=262144, dim=640, n_heads=4, n_kv_heads=1,
                           ffn_dim=2048, max_seq_len=32768, sliding_window=512),
    "gemma3_1b": _gemma3(26, vocab_size=262144, dim=1152, n_heads=4, n_kv_heads=1,
                         ffn_dim=6912, max_seq_len=32768, sliding_window=512),
    "gemma3_4b": _gemma3(34, vocab_size=262208, dim=2560, n_heads=8, n_kv_heads=4,
                         ffn_dim=10240, max_seq_len=131072, sliding_window=1024,
                         rope_type="linear", rope_factor=8.0),
})


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
