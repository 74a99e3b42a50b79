"""Model sizes: the `ModelConfig` dataclass and a table of named presets.

Pure Python (no JAX import) so config files can read it cheaply. The keys are DESIGN.md's
`model.*` config keys; `head_dim` is derived (dim / n_heads) as in every LLaMA release.
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
  dtype: str = "bfloat16"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the weights (and of the optimizer moments)
  remat: str = "none"  # none | full | dots: recompute policy per decoder layer

  def __post_init__(self):
    if self.dim % self.n_heads:
      raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
    if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected one of none, full, dots")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def num_params(self) -> int:
    d, f, hd = self.dim, self.ffn_dim, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.n_layers * layer + d

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
# meta-llama/Llama-2-7b-hf, -13b-hf; LLaMA-3: meta-llama/Meta-Llama-3-8B config.json).
PRESETS: dict[str, dict[str, Any]] = {
    # Runs in seconds on one CPU core; GQA on (4 heads over 2 KV heads) so tests cover it.
    "tiny": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                 max_seq_len=512),
    # The shape issue 4's training benchmark prescribes (vocab 8000, dim 256, 4 layers, ...).
    "bench": dict(vocab_size=8000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                  max_seq_len=1024),
    "llama2_7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_dim=11008, max_seq_len=4096),
    "llama2_13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                       ffn_dim=13824, max_seq_len=4096),
    "llama3_8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_dim=14336, max_seq_len=8192, rope_theta=500000.0),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
