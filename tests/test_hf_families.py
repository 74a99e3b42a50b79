"""Every LLaMA-family layout we read (LLaMA-3.1 rope scaling, LLaMA-3.2 tied + head_dim, Mistral,
explicit head_dim, linear rope) computes what `transformers` computes, in both layer layouts, and
exports back to a directory `transformers` serves with the same logits."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import hf_models
from stable_alignment_jax.model import convert

T = 80  # past the llama3 layouts' original_max_position_embeddings (32)
LENGTHS = [80, 61, 40]


@pytest.fixture(scope="module", params=sorted(hf_models.LAYOUTS))
def layout(request, tmp_path_factory):
  """(name, torch model, its saved directory)."""
  path = tmp_path_factory.mktemp(request.param)
  return request.param, hf_models.build(request.param, path), str(path)


def _batch():
  tokens = np.random.RandomState(0).randint(0, hf_models.BASE["vocab_size"], (len(LENGTHS), T))
  mask = np.arange(T)[None] < np.array(LENGTHS)[:, None]  # right padding
  tokens[~mask] = 0
  return tokens, mask


def hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))
                 ).logits.float().numpy()


def our_logits(graphdef, state, tokens, mask):
  logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), key_mask=jnp.asarray(mask))
  return np.asarray(logits)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_padded_batch_logits_match_transformers(layout, scan_layers):
  name, model, path = layout
  graphdef, state = convert.load_hf(path, dtype="float32", scan_layers=scan_layers)
  cfg = nnx.merge(graphdef, state).cfg
  assert cfg.scan_layers == scan_layers
  assert "lm_head" not in state if cfg.tie_embeddings else "lm_head" in state
  tokens, mask = _batch()
  ref = hf_logits(model, tokens, mask)
  assert ref[mask].std() > 0.5  # not two near-zero tensors compared
  assert np.abs(our_logits(graphdef, state, tokens, mask) - ref)[mask].max() <= 1e-4


def test_config_fields_are_read(layout):
  name, model, path = layout
  cfg = convert.read_hf_config(path)
  hf = model.config
  assert (cfg.head_dim, cfg.tie_embeddings) == (hf.head_dim, hf.tie_word_embeddings)
  rope = hf.rope_parameters
  assert (cfg.rope_type, cfg.rope_theta) == (rope["rope_type"], rope["rope_theta"])
  if cfg.rope_type != "default":
    assert cfg.rope_factor == rope["factor"]
  if cfg.rope_type == "llama3":
    assert cfg.rope_original_max_len == rope["original_max_position_embeddings"] == 32
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (1.0, 4.0)


def test_export_serves_the_same_logits_and_stays_tied(layout, tmp_path):
  name, model, path = layout
  graphdef, state = convert.load_hf(path, dtype="float32")
  out = tmp_path / "out"
  files = convert.save_hf(graphdef, state, str(out), max_shard_bytes=60_000)
  assert len(files) > 1  # sharded with an index, streaming stacked layers per row
  written = json.loads((out / "config.json").read_text())
  names = set()
  for f in files:
    with safe_open(str(out / f), framework="numpy") as fh:
      names |= set(fh.keys())
  tied = model.config.tie_word_embeddings
  assert written["tie_word_embeddings"] is tied and ("lm_head.weight" in names) is not tied
  assert written["head_dim"] == model.config.head_dim
  assert written["rope_parameters"] == {k: v for k, v in model.config.rope_parameters.items()}
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tokens, mask = _batch()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask)[mask],
                                hf_logits(model, tokens, mask)[mask])


def test_unscanned_and_scanned_export_the_same_tensors(tmp_path):
  model = hf_models.build("llama3_1", tmp_path / "in")
  for scan in (True, False):
    convert.save_hf(*convert.load_hf(str(tmp_path / "in"), dtype="float32", scan_layers=scan),
                    str(tmp_path / f"out{scan}"))
  want = {k: v.numpy() for k, v in model.state_dict().items()}
  for scan in (True, False):
    with safe_open(str(tmp_path / f"out{scan}" / convert.SINGLE_FILE), framework="numpy") as fh:
      assert set(fh.keys()) == set(want)
      assert all(np.array_equal(fh.get_tensor(k), want[k]) for k in want)


# ----------------------------------------------------------------------------- tied heads


def test_tied_checkpoint_with_a_saved_head_equal_to_the_embedding_loads(tmp_path):
  from safetensors.numpy import load_file, save_file
  model = hf_models.build("llama3_2_tied", tmp_path)
  tensors = load_file(tmp_path / convert.SINGLE_FILE)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, tmp_path / convert.SINGLE_FILE)
  _, state = convert.load_hf(str(tmp_path), dtype="float32")
  assert "lm_head" not in state
  np.testing.assert_array_equal(np.asarray(state["embed"].get_value()),
                                model.model.embed_tokens.weight.detach().numpy())
  tensors["lm_head.weight"][3, 5] += 1.0
  save_file(tensors, tmp_path / convert.SINGLE_FILE)
  with pytest.raises(convert.CheckpointError, match="'lm_head.weight' differs from "
                     "'model.embed_tokens.weight'.*tie_word_embeddings"):
    convert.load_hf(str(tmp_path), dtype="float32")


def test_untied_config_without_a_head_is_a_missing_tensor(tmp_path):
  hf_models.build("llama3_2_tied", tmp_path)
  _edit(tmp_path, tie_word_embeddings=False)
  with pytest.raises(convert.CheckpointError, match="missing tensor 'lm_head.weight'"):
    convert.load_hf(str(tmp_path), dtype="float32")


# ----------------------------------------------------------------------------- refused fields


def _edit(directory, **changes):
  path = directory / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))
  return str(path)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("mistral_src")
  hf_models.build("mistral", path)
  return path


@pytest.mark.parametrize("changes, field, words", [
    (dict(sliding_window=64), "sliding_window", "sliding-window attention is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters", "'yarn' is not supported"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling", "'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "rope_parameters", "needs ['low_freq_factor', 'high_freq_factor', 'original_max_"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
    (dict(attention_bias=True), "attention_bias", "biases"),
    (dict(model_type="qwen2"), "model_type", "unsupported architecture"),
])
def test_unsupported_fields_name_the_file_and_field(mistral_dir, tmp_path, changes, field, words):
  d = tmp_path / "ck"
  shutil.copytree(mistral_dir, d)
  path = _edit(d, **changes)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_hf(str(d), dtype="float32")
  assert path in str(e.value) and repr(field) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("window", [None, 256, 4096])
def test_a_window_covering_the_context_is_full_attention(window):
  c = dict(hf_models.BASE, model_type="mistral", architectures=["MistralForCausalLM"],
           sliding_window=window)
  assert convert.config_from_hf(c).max_seq_len == 256


def test_older_rope_scaling_spelling_reads_the_same(layout):
  """Files from transformers 4 say rope_scaling {"type" or "rope_type": ...} + rope_theta."""
  name, model, path = layout
  c = json.loads(open(f"{path}/config.json").read())
  params = c.pop("rope_parameters")
  c["rope_theta"] = params.pop("rope_theta")
  c["rope_scaling"] = None if params["rope_type"] == "default" else \
      {("type" if name == "linear_rope" else "rope_type") if k == "rope_type" else k: v
       for k, v in params.items()}
  assert convert.config_from_hf(c) == convert.read_hf_config(path)


# ----------------------------------------------------------------------------- compute dtype


@pytest.mark.parametrize("checkpoint, requested, platform, want", [
    ("bfloat16", None, "cpu", "float32"), (None, None, "cpu", "float32"),
    ("bfloat16", "bfloat16", "cpu", "bfloat16"), ("float16", None, "gpu", "float16"),
    (None, None, "tpu", "bfloat16"), ("float32", None, "tpu", "float32"),
    ("bfloat16", "float32", "gpu", "float32"),
])
def test_compute_dtype_follows_the_caller_then_platform_then_checkpoint(
    checkpoint, requested, platform, want):
  from stable_alignment_jax import checkpoints
  assert checkpoints.compute_dtype(checkpoint, requested, platform) == want


def test_load_model_says_which_dtype_it_used(tmp_path, capsys):
  from stable_alignment_jax import checkpoints
  model = hf_models.build("head_dim", tmp_path)
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  graphdef, state = checkpoints.load_model(str(tmp_path))
  assert nnx.merge(graphdef, state).cfg.dtype == "float32"
  err = capsys.readouterr().err
  assert f"model {tmp_path}: compute dtype float32 (cpu; checkpoint says bfloat16)" in err
  checkpoints.load_model(str(tmp_path), dtype="bfloat16")
  assert "compute dtype bfloat16 (requested; checkpoint says bfloat16)" in capsys.readouterr().err
