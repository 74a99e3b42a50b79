"""One rule from a checkpoint spec (and an optional tokenizer a config names) to its tokenizer:
text_sampler.load_spec_tokenizer, used by the sampler, the sandbox's JAX backend and eval."""

import json
import shutil

import pytest

from stable_alignment_jax.data import tokenizer as tok_lib
from stable_alignment_jax.sampling.text_sampler import default_tokenizer, load_spec_tokenizer


def _run_dir(path, data):
  path.mkdir()
  (path / "run_config.json").write_text(json.dumps({"data": data}))
  return str(path)


def test_each_kind_of_spec_implies_its_tokenizer(shared_data, tmp_path, monkeypatch):
  spm = shared_data / "tokenizers" / "llama2_tokenizer.model"
  monkeypatch.setenv("HOME", str(tmp_path))
  shutil.copy(spm, tmp_path / "sp.model")
  ref = tok_lib.SentencePieceTokenizer(str(spm))
  text = "Is it ok to lie? No."
  # random:* has no tokenizer of its own: bytes.
  assert isinstance(load_spec_tokenizer("random:tiny"), tok_lib.ByteTokenizer)
  # A run directory: its data.tokenizer, `~` expanded at load time.
  run = _run_dir(tmp_path / "run", {"tokenizer": "~/sp.model"})
  assert default_tokenizer(run) == "~/sp.model"
  assert load_spec_tokenizer(run).encode(text) == ref.encode(text)
  # An HF directory is its own tokenizer.
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
  shutil.copy(spm, hf / "tokenizer.model")
  assert default_tokenizer(str(hf)) == str(hf)
  assert load_spec_tokenizer(str(hf)).encode(text) == ref.encode(text)
  # A tokenizer the caller names wins over the spec's own.
  assert isinstance(load_spec_tokenizer(str(hf), "byte"), tok_lib.ByteTokenizer)
  assert load_spec_tokenizer("random:tiny", "~/sp.model").encode(text) == ref.encode(text)
  # A hub id names its own tokenizer (downloaded with it; not fetched here).
  assert default_tokenizer("org/model") == "org/model"


def test_specs_without_a_tokenizer_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="model checkpoint not found: ./nowhere"):
    load_spec_tokenizer("./nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither an HF LLaMA directory"):
    load_spec_tokenizer(str(tmp_path / "empty"))
  run = _run_dir(tmp_path / "run", {})
  with pytest.raises(ValueError, match="no data.tokenizer; pass a tokenizer"):
    load_spec_tokenizer(run)
  assert isinstance(load_spec_tokenizer(run, "byte"), tok_lib.ByteTokenizer)
