"""Small random Hugging Face models of each LLaMA-family layout, and the real SmolLM2 as an HF dir.

Every builder returns the torch model (eval mode, float32) after `save_pretrained` into a
directory, so a test can compare our import of that directory against the very same weights.
HF's own init gives near-zero logits, which would hide layout bugs under any tolerance, hence
`randomize`.
"""

import getpass
import os
import pathlib
import tempfile

import torch
import transformers

SHARED_MODELS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models"
SMOLLM2_GGUF = SHARED_MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shared by every layout: GQA (4 heads over 2 KV heads), 2 layers, a vocabulary that is not a
# power of two, non-default theta and eps so a field read wrongly changes the logits.
BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

WINDOW = 24  # the sliding layers' window in the layouts that have one

# Name -> (config class, config kwargs on top of BASE). Positions in the tests go past 32, the
# llama3 original context, so the scaled frequency bands all matter.
LAYOUTS = {
    "llama3_1": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama3_2_tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, head_dim=32, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, rope_theta=30000.0)),
    "head_dim": (transformers.LlamaConfig, dict(head_dim=24, rope_theta=20000.0)),
    "linear_rope": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="linear", rope_theta=20000.0, factor=4.0))),
    # The families beyond LLaMA. WINDOW is shorter than the tests' sequences, so the sliding
    # layers' masks (training, prefill) and the decode cache's window all matter.
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=WINDOW, rope_theta=30000.0)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e6)),
    "qwen2_tied_window": (transformers.Qwen2Config, dict(
        rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, rope_theta=1e6)),
    # Small soft-caps so the tanh bends the scores and logits these random weights give.
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0, sliding_window=WINDOW, tie_word_embeddings=True,
        rope_theta=10000.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
            full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
            sliding_attention=dict(rope_type="default", rope_theta=10000.0)))),
}


def randomize(model, seed: int = 0):
  """Every weight random at a scale that gives O(1..10) logits; norms not all-ones."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif p.ndim == 2:
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else p.shape[1] ** -0.5))
  return model


def build(layout: str, path, seed: int = 0, **overrides):
  """A random f32 model of `layout` (a LAYOUTS key) saved at `path`; returns the torch model."""
  cls, kw = LAYOUTS[layout]
  config = cls(**{**BASE, **kw, **overrides})
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  randomize(model.eval(), seed)
  if config.tie_word_embeddings:
    model.tie_weights()
  model.save_pretrained(path)
  return model


def smollm2_dir() -> pathlib.Path:
  """An HF directory (safetensors f32, tokenizer, chat template) holding the dequantized
  SmolLM2-135M-Instruct GGUF. Cached in a per-user temp dir keyed by the GGUF's size and
  mtime, so test sessions after the first reuse it. Raises FileNotFoundError without the GGUF."""
  if not SMOLLM2_GGUF.exists():
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found")
  st = SMOLLM2_GGUF.stat()
  root = pathlib.Path(tempfile.gettempdir()) / f"stable_alignment_jax-{getpass.getuser()}"
  out = root / f"smollm2-135m-{st.st_size}-{int(st.st_mtime)}"
  if (out / "DONE").exists():
    return out
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="smollm2-", dir=_mkdir(root)))
  _convert_gguf(SMOLLM2_GGUF, tmp)
  (tmp / "DONE").write_text("ok\n")
  try:
    os.replace(tmp, out)  # atomic: a concurrent session either sees all of it or none
  except OSError:  # another session finished first
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _mkdir(p: pathlib.Path) -> pathlib.Path:
  p.mkdir(parents=True, exist_ok=True)
  return p


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
  from stable_alignment_jax.model import gguf as gguf_lib
  gguf_lib.to_hf(str(gguf), str(out))
