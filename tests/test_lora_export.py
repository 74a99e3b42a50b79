"""LoRA out of our runs: the PEFT adapter that `peft` loads onto the HF base computes our logits,
and the merged HF export is the base plus (alpha / r) B.A, computed here with numpy from the
adapter files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import hf_models
from stable_alignment_jax.model import convert
from stable_alignment_jax.model import peft as peft_format

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF name -> (our weight's path in a layer, leading `in` dims of its einsum layout)
OURS = {"q_proj": (("attn", "wq"), 1), "k_proj": (("attn", "wk"), 1), "v_proj": (("attn", "wv"), 1),
        "o_proj": (("attn", "wo"), 2), "gate_proj": (("mlp", "w_gate"), 1),
        "up_proj": (("mlp", "w_up"), 1), "down_proj": (("mlp", "w_down"), 1)}
RANK, ALPHA = 4, 8.0
T = 40


def _layer_weight(pure, layer, target):
  sub, _ = OURS[target]
  node = pure["layers"]
  stacked = layer not in node  # scan_layers: one [L, ...] array per weight
  node = node if stacked else node[layer]
  for k in sub[:-1]:
    node = node[k]
  return node, sub[-1], stacked


def hand_adapters(state, rank=RANK, seed=0, targets=TARGETS):
  """(layer, target, A [in..., r], B [r, out...]) per the LoRA spec, A and B both random (a zero
  B, the training init, would hide every layout mistake in B)."""
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  n_layers = (len(pure["layers"]) if 0 in pure["layers"] else
              np.asarray(pure["layers"]["attn"]["wq"]).shape[0])
  items = []
  for i in range(n_layers):
    for t in targets:
      node, leaf, stacked = _layer_weight(pure, i, t)
      w = np.asarray(node[leaf][i] if stacked else node[leaf])
      n_in = OURS[t][1]
      a = rng.normal(size=w.shape[:n_in] + (rank,)) * 0.2
      b = rng.normal(size=(rank,) + w.shape[n_in:]) * 0.2
      items.append((i, t, a.astype(np.float32), b.astype(np.float32)))
  return items


def numpy_merge(state, items, alpha=ALPHA, rank=RANK):
  """W + (alpha / r) A.B for every item, in numpy (the spec's merge, written out by hand)."""
  pure = nnx.to_pure_dict(state)
  for i, t, a, b in items:
    node, leaf, stacked = _layer_weight(pure, i, t)
    delta = (alpha / rank) * np.tensordot(a, b, axes=([-1], [0]))
    if stacked:
      w = np.array(node[leaf])
      w[i] = w[i] + delta
      node[leaf] = w
    else:
      node[leaf] = np.asarray(node[leaf]) + delta
  out = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(out, pure)
  return out


def our_logits(graphdef, state, tokens):
  logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A random HF LLaMA-3.1-layout base (GQA, untied head) saved as an HF directory, and our
  import of it."""
  path = tmp_path_factory.mktemp("base")
  hf_models.build("llama3_1", path)
  graphdef, state = convert.load_hf(str(path), dtype="float32")
  return str(path), graphdef, state


def test_peft_loads_our_adapter_onto_the_hf_base_with_our_logits(base, tmp_path):
  from peft import PeftModel
  path, graphdef, state = base
  items = hand_adapters(state)
  out = peft_format.write_adapter(str(tmp_path / "adapter"), items, rank=RANK, alpha=ALPHA,
                                  dropout=0.05, targets=TARGETS, base_model=path)
  cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
      ("LORA", "CAUSAL_LM", RANK, ALPHA, "none")
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  model = PeftModel.from_pretrained(hf, out).eval()
  # Every tensor we wrote is the one PEFT holds (a name it did not know would stay at its init).
  held = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
  written = load_file(f"{out}/adapter_model.safetensors")
  assert sorted(held) == sorted(written) and len(written) == 2 * 2 * len(TARGETS)
  for k, v in written.items():
    np.testing.assert_array_equal(held[k].numpy(), v)
  tokens = np.random.default_rng(1).integers(0, 300, (2, T))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.float().numpy()
  ours = our_logits(graphdef, numpy_merge(state, items), tokens)
  assert np.abs(ours - ref).max() <= 1e-4
  # the adapters matter: the base alone is far from it
  base_logits = our_logits(graphdef, state, tokens)
  assert np.abs(base_logits - ref).max() > 0.1


def test_merged_export_is_the_base_plus_scaled_b_a(base, tmp_path):
  path, graphdef, state = base
  items = hand_adapters(state, seed=3)
  adapter = peft_format.write_adapter(str(tmp_path / "adapter"), items, rank=RANK, alpha=ALPHA,
                                      dropout=0.0, targets=TARGETS, base_model=path)
  convert.save_hf(graphdef, numpy_merge(state, items), str(tmp_path / "merged"))
  merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
  orig = load_file(f"{path}/model.safetensors")
  lora = load_file(f"{adapter}/adapter_model.safetensors")
  assert sorted(merged) == sorted(orig)
  changed = 0
  for name, w in orig.items():
    module = name[:-len(".weight")]
    a_name = f"base_model.model.{module}.lora_A.weight"
    if a_name in lora:  # HF [out, in] = W + (alpha / r) lora_B [out, r] @ lora_A [r, in]
      want = w + (ALPHA / RANK) * (lora[a_name.replace("lora_A", "lora_B")] @ lora[a_name])
      changed += 1
    else:
      want = w
    np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  assert changed == 2 * len(TARGETS)


def test_adapter_writer_refuses_what_peft_would_misread(base, tmp_path):
  _, _, state = base
  items = hand_adapters(state)
  with pytest.raises(ValueError, match="rank 4, lora.rank says 8"):
    peft_format.write_adapter(str(tmp_path / "a"), items, rank=8, alpha=ALPHA, dropout=0.0,
                              targets=TARGETS, base_model="x")
  with pytest.raises(ValueError, match="does not name"):
    peft_format.write_adapter(str(tmp_path / "b"), items, rank=RANK, alpha=ALPHA, dropout=0.0,
                              targets=("q_proj",), base_model="x")
  peft_format.write_adapter(str(tmp_path / "c"), items, rank=RANK, alpha=ALPHA, dropout=0.0,
                            targets=TARGETS, base_model="x")
  with pytest.raises(FileExistsError):
    peft_format.write_adapter(str(tmp_path / "c"), items, rank=RANK, alpha=ALPHA, dropout=0.0,
                              targets=TARGETS, base_model="x")


# --- LoRA run directories: export, PEFT, loading for inference and as the next stage's start ---

def lora_run(directory, base_dir, *, quantize="", seed=5, hf_base=None):
  """A LoRA run directory as the trainer leaves one (Orbax `params` = the adapters alone,
  run_config.json with `lora` and checkpoint.init_from = the base), its B random and nonzero.
  hf_base: the HF directory at the bottom of the chain when base_dir is a run. Returns
  (run_dir, cfg, lcfg, adapters)."""
  import dataclasses
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.model import lora
  cfg = dataclasses.replace(convert.read_hf_config(hf_base or base_dir), dtype="float32",
                            param_dtype="float32")
  lcfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, quantize=quantize)
  adapters = lora.init_adapters(cfg, lcfg, seed=seed)
  pure = nnx.to_pure_dict(adapters)
  rng = np.random.default_rng(seed)
  pure = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.normal(size=x.shape) * 0.2).astype(np.float32)
      if jax.tree_util.keystr(p).endswith("['b']") else x, pure)
  nnx.replace_by_pure_dict(adapters, pure)
  run_dir = str(directory)
  with checkpoints.manager(run_dir, async_save=False) as mgr:
    checkpoints.save_train_state(mgr, 7, {"params": adapters}, data_iter={}, config={})
    mgr.wait_until_finished()
  run = {"seed": 0, "model": dataclasses.asdict(cfg), "data": {"tokenizer": "byte"},
         "lora": {**dataclasses.asdict(lcfg), "targets": list(lcfg.targets)},
         "checkpoint": {"init_from": base_dir, "dir": run_dir}}
  with open(f"{run_dir}/run_config.json", "w") as f:
    json.dump(run, f)
  return run_dir, cfg, lcfg, adapters


def lora_logits(cfg, lcfg, adapters, base_state, tokens):
  """Our LoRA model's forward (adapters beside the weights, never merged; a quantized base
  dequantized per layer): what training computes."""
  from stable_alignment_jax.model import lora
  g = lora.graphs(cfg, lcfg)
  frozen = lora.frozen_base(cfg, lcfg, base_state)
  logits, _ = lora.merged_model(g, adapters, frozen)(jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.fixture(scope="module")
def byte_base(tmp_path_factory):
  """A random HF base whose vocabulary fits the byte tokenizer (384 ids)."""
  path = tmp_path_factory.mktemp("byte_base")
  hf_models.build("llama3_1", path, vocab_size=384)
  graphdef, state = convert.load_hf(str(path), dtype="float32")
  return str(path), graphdef, state


def test_lora_run_exports_a_peft_adapter_and_a_merged_checkpoint(byte_base, tmp_path):
  from peft import PeftModel
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  path, graphdef, state = byte_base
  run_dir, cfg, lcfg, adapters = lora_run(tmp_path / "run", path)
  adapter = checkpoints.export_peft(run_dir, str(tmp_path / "adapter"))
  assert json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"] == path
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  model = PeftModel.from_pretrained(hf, adapter).eval()
  tokens = np.random.default_rng(2).integers(0, 384, (2, T))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.float().numpy()
  ours = lora_logits(cfg, lcfg, adapters, state, tokens)
  assert np.abs(ours - ref).max() <= 1e-4
  assert np.abs(our_logits(graphdef, state, tokens) - ref).max() > 0.1  # adapters matter
  # merged: the base's tensors + (alpha / r) lora_B @ lora_A, with numpy from the two files
  checkpoints.export_hf(run_dir, str(tmp_path / "merged"), tokenizer="")
  merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
  orig = load_file(f"{path}/model.safetensors")
  lora_t = load_file(f"{adapter}/adapter_model.safetensors")
  assert sorted(merged) == sorted(orig)
  changed = 0
  for name, w in orig.items():
    a_name = f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"
    if a_name in lora_t:
      w = w + (ALPHA / RANK) * (lora_t[a_name.replace("lora_A", "lora_B")] @ lora_t[a_name])
      changed += 1
    np.testing.assert_allclose(merged[name], w, rtol=1e-5, atol=1e-5, err_msg=name)
  assert changed == 2 * len(TARGETS)


def test_peft_export_refuses_a_run_without_an_hf_base(byte_base, tmp_path):
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  path, _, state = byte_base
  first, *_ = lora_run(tmp_path / "first", path)
  second, *_ = lora_run(tmp_path / "second", first, hf_base=path)  # LoRA on a LoRA stage
  with pytest.raises(ValueError, match="itself a LoRA run"):
    checkpoints.export_peft(second, str(tmp_path / "adapter"))
  with pytest.raises(ValueError, match="not a LoRA run"):
    checkpoints.save_model(convert.read_hf_config(path), state, str(tmp_path / "full"))
    checkpoints.export_peft(str(tmp_path / "full"), str(tmp_path / "adapter"))


@pytest.mark.parametrize("quantize", ["", "nf4"])
def test_a_lora_run_loads_merged_for_inference_and_as_a_next_stage(byte_base, tmp_path,
                                                                   quantize):
  """load_model (serve, generate, SANDBOX, eval), TextSampler and init_from all get the base
  + adapters, computing what the LoRA model computed in training (QLoRA: on its dequantized
  base); a LoRA stage on top of that run stacks on the merged model."""
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.training import scaffold
  from stable_alignment_jax.model import sharding
  from stable_alignment_jax.model import lora
  from stable_alignment_jax.sampling.generate import SamplingParams
  from stable_alignment_jax.sampling.text_sampler import TextSampler
  from configs import stage2
  path, _, state = byte_base
  run_dir, cfg, lcfg, adapters = lora_run(tmp_path / "run", path, quantize=quantize)
  tokens = np.random.default_rng(3).integers(0, 384, (2, T))
  want = lora_logits(cfg, lcfg, adapters, state, tokens)
  graphdef, merged = checkpoints.load_model(run_dir, dtype="float32")
  assert np.abs(our_logits(graphdef, merged, tokens) - want).max() <= 1e-4
  # the next stage starting from the LoRA run gets the same merged weights
  c = stage2.get_config("tiny")
  c.checkpoint.init_from = run_dir
  checkpoints.fill_model_from_init(c)
  mesh = sharding.make_mesh({"fsdp": -1})
  params, origin = scaffold.init_model(c, scaffold.model_config(c), mesh)
  assert run_dir in origin
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a LoRA stage on top of it: merged = its base (the merged run) + its own adapters
  second, _, _, ad2 = lora_run(tmp_path / "second", run_dir, seed=9, hf_base=path)
  g2, merged2 = checkpoints.load_model(second, dtype="float32")
  want2 = lora_logits(cfg, lora.LoraConfig(rank=RANK, alpha=ALPHA), ad2, merged, tokens)
  assert np.abs(our_logits(g2, merged2, tokens) - want2).max() <= 1e-4
  if quantize:
    return
  # TextSampler on the run directory = on its merged HF export: the same greedy tokens
  checkpoints.export_hf(run_dir, str(tmp_path / "merged_hf"), tokenizer="")
  sp = SamplingParams(max_new_tokens=12)
  prompts = ["Hello there", "What is 2+2?"]
  got = [c.token_ids for c in TextSampler.load(run_dir, tokenizer="byte", dtype="float32"
                                                ).complete(prompts, sp)]
  ref = [c.token_ids for c in TextSampler.load(str(tmp_path / "merged_hf"), tokenizer="byte",
                                                dtype="float32").complete(prompts, sp)]
  assert got == ref and all(got)


def test_convert_cli_writes_the_adapter_and_the_merged_model(byte_base, tmp_path):
  import pathlib
  import subprocess
  import sys
  import subproc
  path, _, _ = byte_base
  run_dir, *_ = lora_run(tmp_path / "run", path)
  root = pathlib.Path(__file__).resolve().parents[1]
  r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.convert", f"--from={run_dir}",
                      f"--to_peft={tmp_path / 'peft'}", f"--to_hf={tmp_path / 'hf'}"],
                     cwd=root, env=subproc.jax_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
  assert (tmp_path / "hf" / "model.safetensors").exists()
  r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.convert", f"--from={path}",
                      f"--to_peft={tmp_path / 'x'}"], cwd=root, env=subproc.jax_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "convert: error:" in r.stderr and "run_config.json" in r.stderr
