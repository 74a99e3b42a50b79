"""Text embedders for the agents' internal memory (question -> answer, recalled by cosine).

- `hashing`: zero-dependency feature hashing of words and word bigrams; deterministic, for tests
  and for runs where recall quality matters little.
- `openai`: any OpenAI-compatible `/v1/embeddings` endpoint through the official SDK.
- `minilm`: all-MiniLM-L6-v2 (or any BERT sentence encoder) from a local directory in the
  HF layout, mean-pooled with torch; no network.
Every embedder returns L2-normalised float32 rows, so cosine similarity is a dot product.
"""

import hashlib
import os
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def _normalise(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float32)
  norm = np.linalg.norm(m, axis=-1, keepdims=True)
  return m / np.maximum(norm, 1e-12)


class HashingEmbedder:
  """Signed feature hashing (one blake2b per feature) of lower-cased words and word bigrams."""

  def __init__(self, dim: int = 256):
    if dim <= 0:
      raise ValueError(f"embedder.dim must be positive, got {dim}")
    self.dim = dim
    self.name = f"hashing-{dim}"

  def embed(self, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      words = _WORD.findall(text.lower())
      for feat in words + [a + " " + b for a, b in zip(words, words[1:])]:
        h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
        out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
    return _normalise(out)


class OpenAIEmbedder:
  """`client.embeddings.create` against `base_url`; the key comes from the env var only."""

  def __init__(self, model: str, base_url: str, api_key_env: str, batch_size: int = 256):
    import openai
    self.name = f"openai:{base_url}:{model}"
    self.model, self.batch_size = model, batch_size
    self.client = openai.OpenAI(base_url=base_url, api_key=require_env(api_key_env))

  def embed(self, texts: list[str]) -> np.ndarray:
    rows = []
    for i in range(0, len(texts), self.batch_size):
      resp = self.client.embeddings.create(model=self.model, input=texts[i:i + self.batch_size])
      rows.extend(d.embedding for d in sorted(resp.data, key=lambda d: d.index))
    return _normalise(np.asarray(rows, np.float32).reshape(len(texts), -1))


class MiniLMEmbedder:
  """A sentence encoder from a local HF directory (config.json, weights, tokenizer files)."""

  def __init__(self, path: str, batch_size: int = 64):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"embedder.path={path!r}: not a directory holding a sentence "
                              "encoder (e.g. all-MiniLM-L6-v2 in the HF layout)")
    import torch
    import transformers
    self.torch = torch
    self.name = f"minilm:{os.path.abspath(path)}"
    self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    self.batch_size = batch_size

  def embed(self, texts: list[str]) -> np.ndarray:
    rows = []
    with self.torch.no_grad():
      for i in range(0, len(texts), self.batch_size):
        enc = self.tok(texts[i:i + self.batch_size], padding=True, truncation=True,
                       max_length=256, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy())
    return _normalise(np.concatenate(rows, 0) if rows else np.zeros((0, 1)))


def require_env(name: str) -> str:
  """The value of env var `name`; a clear error (naming the variable, not a value) if unset."""
  value = os.environ.get(name)
  if not value:
    raise EnvironmentError(f"environment variable {name} is not set; the API key is read "
                           "from the environment only")
  return value


def make_embedder(cfg) -> object:
  """cfg: the `embedder` config block {kind, dim, model, base_url, api_key_env, path}."""
  kind = cfg.kind
  builders = {
      "hashing": lambda: HashingEmbedder(int(cfg.get("dim", 256))),
      "openai": lambda: OpenAIEmbedder(cfg.model, cfg.base_url, cfg.api_key_env),
      "minilm": lambda: MiniLMEmbedder(cfg.path),
  }
  if kind not in builders:
    raise KeyError(f"config.embedder.kind={kind!r}: unknown embedder; known: {sorted(builders)}")
  return builders[kind]()
