"""HF LLaMA checkpoints in and out, checked against `transformers` on the same random weights."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_models
import subproc
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_KW = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rope_theta=20000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def random_hf_model(seed=0, **kw):
  """A LlamaForCausalLM with random weights at a scale that gives O(1..10) logits."""
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **kw})).eval()
  return hf_models.randomize(model, seed)


def hf_logits(model, tokens, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.float().numpy()


def our_logits(graphdef, state, tokens, mask=None):
  model = nnx.merge(graphdef, state)
  logits, _ = model(jnp.asarray(tokens), key_mask=None if mask is None else jnp.asarray(mask))
  return np.asarray(logits)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(torch model, single-file dir, sharded dir) of one random model."""
  model = random_hf_model()
  single = tmp_path_factory.mktemp("hf_single")
  sharded = tmp_path_factory.mktemp("hf_sharded")
  model.save_pretrained(single)
  model.save_pretrained(sharded, max_shard_size="100KB")
  assert (sharded / convert.INDEX_FILE).exists() and (single / convert.SINGLE_FILE).exists()
  return model, str(single), str(sharded)


@pytest.fixture(scope="module")
def ours(hf):
  return convert.load_hf(hf[1], dtype="float32")


def _leaves(state):
  flat = nnx.to_flat_state(state)
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def test_padded_batch_logits_match_transformers(hf, ours):
  rng = np.random.RandomState(1)
  lengths = [24, 17, 9]
  tokens = rng.randint(0, 300, (3, 24))
  mask = np.arange(24)[None] < np.array(lengths)[:, None]  # right padding
  tokens[~mask] = 0
  ref = hf_logits(hf[0], tokens, mask.astype(np.int64))
  got = our_logits(*ours, tokens, mask)
  assert ref.std() > 1.0  # the comparison is not between two near-zero tensors
  assert np.abs(got - ref)[mask].max() <= 1e-4


def test_long_prompt_logits_match_transformers(hf, ours):
  tokens = np.random.RandomState(2).randint(0, 300, (1, 400))  # RoPE bugs hide in short prompts
  diff = np.abs(our_logits(*ours, tokens) - hf_logits(hf[0], tokens))
  assert diff.max() <= 1e-4


def test_sharded_index_loads_the_same_params(hf, ours):
  a, b = _leaves(ours[1]), _leaves(convert.load_hf(hf[2], dtype="float32")[1])
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_round_trip_ours_hf_ours_is_exact(hf, ours, tmp_path):
  files = convert.save_hf(ours[0], ours[1], str(tmp_path), max_shard_bytes=150_000)
  assert len(files) > 1 and (tmp_path / convert.INDEX_FILE).exists()
  back = convert.load_hf(str(tmp_path), dtype="float32")
  a, b = _leaves(ours[1]), _leaves(back[1])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # transformers reads what we wrote, and computes exactly what the original torch model did.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert isinstance(reloaded, transformers.LlamaForCausalLM)
  tokens = np.random.RandomState(3).randint(0, 300, (2, 40))
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf[0], tokens))


def test_bf16_checkpoint_in_and_out(hf, tmp_path):
  model = random_hf_model().to(torch.bfloat16)
  model.save_pretrained(tmp_path / "in")
  graphdef, state = convert.load_hf(str(tmp_path / "in"), dtype="float32")
  want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*E, D]
  got = np.asarray(state["layers"]["attn"]["wq"].get_value())[1]  # stacked [L, D, H, E]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got.reshape(64, 64).T, want)
  convert.save_hf(graphdef, state, str(tmp_path / "out"), dtype="bfloat16")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert reloaded.dtype == torch.bfloat16
  want = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
  got = reloaded.state_dict()
  assert all(torch.equal(got[k], v) for k, v in want.items())
  # (`.to(bfloat16)` also rounds torch's rotary buffer, so logits are compared between two
  # models transformers itself loaded.)
  original = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "in"))
  tokens = np.random.RandomState(4).randint(0, 300, (1, 30))
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(original, tokens))


def test_load_on_8_device_mesh_gives_the_same_logits(hf, ours):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = checkpoints.load_hf(hf[2], dtype="float32", mesh=mesh)
  wq = state["layers"]["attn"]["wq"].get_value()  # stacked [L, D, H, E]; L replicated
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len({s.device for s in wq.addressable_shards}) == 8
  tokens = np.random.RandomState(5).randint(0, 300, (4, 64))

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  with sharding.activate(mesh):
    got = np.asarray(forward(state, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, our_logits(*ours, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_holds_about_one_tensor_on_the_host(tmp_path, scan_layers):
  """Streaming: transient host allocations during the import stay near one parameter (one
  layer's tensor, or with scan_layers one [L, ...] stack of them).

  On the CPU backend device buffers may alias host numpy memory, so what the loaded model keeps
  is subtracted: peak - still-allocated = staging memory. Reading the whole file first (or
  converting the whole model on the host) would make that at least the model size.
  """
  layers = 8
  model = random_hf_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4)
  model.save_pretrained(tmp_path)
  total = sum(p.numel() * 4 for p in model.parameters())
  tensor = max(p.numel() * 4 for p in model.parameters())  # one HF tensor, f32
  stack = tensor * (layers if scan_layers else 1)  # one parameter of ours
  # Measured in a fresh process: tracemalloc counts every thread's allocations, and in the
  # suite's process earlier tests leave threads running (loaders, checkpointers, servers) whose
  # allocations landed in the window (17.5 MB against the 13.5 MB bound, 1 suite run in 3).
  # Without the cycle collector, garbage made during the load stays in `current` as well as in
  # `peak`, so peak - current is the staging alone.
  code = f"""
import gc, json, tracemalloc
from stable_alignment_jax.model import convert
load = lambda: convert.load_hf({str(tmp_path)!r}, dtype="float32", scan_layers={scan_layers})
load()  # warm caches (jax tracing, imports)
gc.collect()
gc.disable()
tracemalloc.start()
loaded = load()
current, peak = tracemalloc.get_traced_memory()
print(json.dumps([current, peak, loaded is not None]))
"""
  env = subproc.jax_env()
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  current, peak, loaded = json.loads(r.stdout.strip().splitlines()[-1])
  assert total > 3 * stack and loaded
  # The parameter being built, a tensor read, its transposed copy and a device copy, plus 2 MiB
  # of Python objects (tracing the abstract model); the whole model would be 32 MB.
  assert peak - current < stack + 3 * tensor + (2 << 20), (peak, current, stack, tensor, total)


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_config(directory, **changes):
  path = pathlib.Path(directory) / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))
  return str(path)


def test_missing_shard_names_the_index_and_the_file(hf, tmp_path):
  d = _copy(hf[2], tmp_path / "ck")
  index = json.loads((d / convert.INDEX_FILE).read_text())["weight_map"]
  shard = index["model.layers.1.mlp.down_proj.weight"]
  os.remove(d / shard)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_hf(str(d))
  msg = str(e.value)
  assert convert.INDEX_FILE in msg and shard in msg and "does not exist" in msg


def test_shape_mismatch_names_the_file_tensor_and_both_shapes(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "ck")
  _edit_config(d, intermediate_size=180)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_hf(str(d))
  msg = str(e.value)
  assert convert.SINGLE_FILE in msg and "model.layers.0.mlp.gate_proj.weight" in msg
  assert "(176, 64)" in msg and "(180, 64)" in msg


def test_missing_and_unexpected_tensors_are_named(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "ck")
  tensors = load_file(d / convert.SINGLE_FILE)
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, d / convert.SINGLE_FILE)
  with pytest.raises(convert.CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn"
                     r"\.k_proj\.weight'") as e:
    convert.load_hf(str(d))
  assert convert.SINGLE_FILE in str(e.value)
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
  save_file(tensors, d / convert.SINGLE_FILE)
  with pytest.raises(convert.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\."
                     r"self_attn\.q_proj\.bias'"):
    convert.load_hf(str(d))


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_parameters"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_config_names_the_file_and_field(hf, tmp_path, changes, field):
  d = _copy(hf[1], tmp_path / "ck")
  path = _edit_config(d, **changes)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_hf(str(d))
  assert path in str(e.value) and repr(field) in str(e.value)


def test_a_llama_config_with_a_sliding_window_key_is_full_attention_as_in_transformers(hf):
  """LlamaForCausalLM has no window: transformers ignores the key, so we do (Mistral, Qwen and
  Gemma read it)."""
  c = json.loads((pathlib.Path(hf[1]) / "config.json").read_text())
  assert convert.config_from_hf(dict(c, sliding_window=128)).layer_types == ()
  mistral = dict(c, sliding_window=128, model_type="mistral", architectures=["MistralForCausalLM"])
  assert convert.config_from_hf(dict(mistral, max_position_embeddings=512)).sliding_window == 128


def test_config_from_hf_maps_fields_and_defaults():
  cfg = convert.config_from_hf(dict(
      architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128,
      intermediate_size=344, num_hidden_layers=3, num_attention_heads=8, vocab_size=500,
      rope_theta=5e5, rms_norm_eps=1e-6, max_position_embeddings=4096), dtype="float32")
  assert (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == \
      (128, 344, 3, 8, 8, 500)  # num_key_value_heads absent -> one kv head per query head
  assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len, cfg.dtype) == (5e5, 1e-6, 4096, "float32")
  back = convert.config_from_hf(convert.config_to_hf(cfg, "float32"), dtype="float32")
  assert back == cfg


def test_cli_imports_and_exports(hf, tmp_path):
  env = subproc.jax_env()
  run = lambda *args: subprocess.run([sys.executable, "-m", "stable_alignment_jax.model.convert",
                                      *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=300)
  r = run(f"--from_hf={hf[2]}", f"--to={tmp_path / 'ours'}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = run(f"--from={tmp_path / 'ours'}", f"--to_hf={tmp_path / 'hf_out'}")
  assert r.returncode == 0, r.stderr[-2000:]
  a = _leaves(convert.load_hf(hf[1], dtype="float32")[1])
  b = _leaves(convert.load_hf(str(tmp_path / "hf_out"), dtype="float32")[1])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  r = run("--to_hf=x")
  assert r.returncode != 0 and "--from_hf" in r.stderr


def test_cli_bad_checkpoint_is_one_line_and_nonzero(hf, tmp_path):
  env = subproc.jax_env()
  bad_field = _copy(hf[1], tmp_path / "bad_field")
  _edit_config(bad_field, hidden_act="gelu")
  no_tensor = _copy(hf[1], tmp_path / "no_tensor")
  tensors = load_file(no_tensor / convert.SINGLE_FILE)
  del tensors["model.norm.weight"]
  save_file(tensors, no_tensor / convert.SINGLE_FILE)
  cases = [(tmp_path / "nowhere", "checkpoint directory not found"),
           (bad_field, "field 'hidden_act' = 'gelu'"),
           (no_tensor, "missing tensor 'model.norm.weight'")]
  for src, words in cases:
    r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.model.convert",
                        f"--from_hf={src}", f"--to={tmp_path / 'out'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("convert: error: ") and words in lines[0] and str(src) in lines[0]


def test_cli_round_trip_carries_tokenizer_chat_template_and_generation_config(
    hf, tmp_path, smollm2_dir):
  """HF -> ours -> HF through the CLI keeps what serving needs beside the weights (an eos list
  in generation_config.json as LLaMA-3 ships it)."""
  src = _copy(hf[1], tmp_path / "src")
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(smollm2_dir / name, src / name)
  (src / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": False}))
  env = subproc.jax_env()
  for args in ([f"--from_hf={src}", f"--to={tmp_path / 'ours'}"],
               [f"--from={tmp_path / 'ours'}", f"--to_hf={tmp_path / 'out'}"]):
    r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.model.convert", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
  out = tmp_path / "out"
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json"):
    assert (out / name).read_bytes() == (src / name).read_bytes(), name
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 7]
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert gen.eos_token_id == [2, 7]
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_gguf_cli_names_a_missing_file(tmp_path):
  missing = tmp_path / "none.gguf"
  # A subprocess: the CLI defines its absl flags when it runs, on the process's global FLAGS.
  r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.model.gguf", f"--gguf={missing}",
                      f"--to_hf={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 1
  assert f"gguf: error: {missing}: no such GGUF file" in r.stderr
  assert not (tmp_path / "out").exists()
