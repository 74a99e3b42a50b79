"""Every layout we read (LLaMA-3.1 rope scaling, LLaMA-3.2 tied + head_dim, Mistral with and without
a window, explicit head_dim, linear rope, Qwen2 tied/untied/windowed, Qwen3, Gemma 2, Gemma 3)
computes what `transformers` computes, in both layer layouts, greedy-decodes what its `generate`
does past the window, and exports back to a directory `transformers` serves with the same
logits."""

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
from stable_alignment_jax.model import convert, llama

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


WINDOWED = sorted(n for n, (_, kw) in hf_models.LAYOUTS.items() if kw.get("sliding_window"))


@pytest.mark.parametrize("name", WINDOWED)
def test_the_window_is_live(name, tmp_path):
  """Without its window the same model computes other logits past it (so the parity above
  tests the window, and its off-by-one: transformers' `kv_idx > q_idx - sliding_window`)."""
  import dataclasses
  model = hf_models.build(name, tmp_path)
  graphdef, state = convert.load_hf(str(tmp_path), dtype="float32")
  cfg = nnx.merge(graphdef, state).cfg
  tokens, mask = _batch()
  ref = hf_logits(model, tokens, mask)
  for window in (hf_models.WINDOW - 1, hf_models.WINDOW + 1):
    other = dataclasses.replace(cfg, sliding_window=window)
    g = nnx.graphdef(nnx.eval_shape(lambda: llama.Llama(other, rngs=nnx.Rngs(0))))
    diff = np.abs(our_logits(g, state, tokens, mask) - ref)
    assert diff[:, :hf_models.WINDOW - 1][mask[:, :hf_models.WINDOW - 1]].max() <= 1e-4
    assert diff[mask].max() > 1e-2


def test_greedy_decode_matches_transformers_generate_past_the_window(layout):
  """32 greedy tokens through our cached decode (a left-padded batch, the cache growing as it
  fills from 8 new slots) equal HF `generate` on each prompt alone; prompt + new tokens pass the
  window, and the local layers' rings (window + 15 slots beside a global layer) wrap, the
  50-token prompt's prefill already."""
  from stable_alignment_jax.sampling.generate import SamplingParams, Sampler
  name, model, path = layout
  graphdef, state = convert.load_hf(path, dtype="float32")
  rng = np.random.RandomState(1)
  prompts = [rng.randint(3, hf_models.BASE["vocab_size"], n).tolist() for n in (50, 20, 7)]
  model.generation_config.eos_token_id = None  # random weights: no early stop on either side
  sampler = Sampler(graphdef, state, eos_id=-1, min_window=8)
  ours = sampler.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
  cfg = sampler.cfg
  mixed = cfg.any_sliding and not all(map(cfg.is_sliding, range(cfg.n_layers)))
  assert [v.shape[1] for v in llama.init_cache(cfg, 1, 100).v] == [
      hf_models.WINDOW + 15 if mixed and cfg.is_sliding(i) else 100 for i in range(cfg.n_layers)]
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      want = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    assert len(prompt) + 32 > hf_models.WINDOW
    assert got == want


def _head_dim(hf):  # Qwen2's config has no head_dim field
  return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def test_config_fields_are_read(layout):
  name, model, path = layout
  cfg = convert.read_hf_config(path)
  hf = model.config
  assert (cfg.head_dim, cfg.tie_embeddings) == (_head_dim(hf), hf.tie_word_embeddings)
  rope = hf.rope_parameters
  if "full_attention" in rope:  # Gemma 3: one RoPE per layer type
    assert cfg.rope_local_theta == rope["sliding_attention"]["rope_theta"] == 10000.0
    rope = rope["full_attention"]
  window = getattr(hf, "sliding_window", None)
  types = getattr(hf, "layer_types", None) or ["sliding_attention" if window else "full"] * 2
  assert cfg.sliding_window == (window or 0)
  assert [cfg.is_sliding(i) for i in range(2)] == [t == "sliding_attention" for t in types]
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
  assert written["head_dim"] == _head_dim(model.config)
  # a Mistral without a window is a LLaMA, and written as one
  assert written["model_type"] == ("llama" if name == "mistral" else model.config.model_type)
  assert written["rope_parameters"] == {k: v for k, v in model.config.rope_parameters.items()}
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(model) or name == "mistral"
  tokens, mask = _batch()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask)[mask],
                                hf_logits(model, tokens, mask)[mask])
  # every tensor (biases, norms) intact, the tie kept in the reloaded model itself
  want, got = model.state_dict(), reloaded.state_dict()
  assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
  if tied:
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


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
    (dict(sliding_window=-3), "sliding_window", "not a positive integer"),
    (dict(sliding_window=64, layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types", "expected 2 entries of ['full_attention', 'sliding_attention']"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters", "'yarn' is not supported"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling", "'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "rope_parameters", "needs ['low_freq_factor', 'high_freq_factor', 'original_max_"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
    (dict(attention_bias=True), "attention_bias", "biases"),
    (dict(model_type="phi3"), "model_type", "unsupported architecture"),
    (dict(model_type="qwen2"), "architectures", "must be ['Qwen2ForCausalLM']"),
    (dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]), "model_type",
     "multimodal Gemma 3"),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_activation="gelu"),
     "hidden_activation", "gelu_pytorch_tanh"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention", "only causal"),
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
  cfg = convert.config_from_hf(c)
  assert (cfg.max_seq_len, cfg.sliding_window, cfg.layer_types) == (256, 0, ())
  windowed = convert.config_from_hf(dict(c, sliding_window=255))
  assert windowed.sliding_window == 255 and windowed.layer_types == ("sliding",) * 2


def test_older_rope_scaling_spelling_reads_the_same(layout):
  """Files from transformers 4 say rope_scaling {"type" or "rope_type": ...} + rope_theta."""
  name, model, path = layout
  c = json.loads(open(f"{path}/config.json").read())
  if "full_attention" in c["rope_parameters"]:  # Gemma 3's older spelling
    params = c.pop("rope_parameters")
    c["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    c["rope_theta"] = params["full_attention"].pop("rope_theta")
    c["rope_scaling"] = params["full_attention"]
    assert convert.config_from_hf(c) == convert.read_hf_config(path)
    return
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
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  assert checkpoints.compute_dtype(checkpoint, requested, platform) == want


def test_load_model_says_which_dtype_it_used(tmp_path, capsys):
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  model = hf_models.build("head_dim", tmp_path)
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  graphdef, state = checkpoints.load_model(str(tmp_path))
  assert nnx.merge(graphdef, state).cfg.dtype == "float32"
  err = capsys.readouterr().err
  assert f"model {tmp_path}: compute dtype float32 (cpu; checkpoint says bfloat16)" in err
  checkpoints.load_model(str(tmp_path), dtype="bfloat16")
  assert "compute dtype bfloat16 (requested; checkpoint says bfloat16)" in capsys.readouterr().err
