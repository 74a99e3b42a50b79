"""A stage can start from a Hugging Face LLaMA (a local directory or a hub id): config.model and
the tokenizer come from the checkpoint, and a model flag the user typed must agree with it."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import hf_models
import subproc
from configs import base, stage1
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.training import train
from stable_alignment_jax.data.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(tmp_path, init_from):
  c = stage1.get_config("tiny")
  c.checkpoint.dir, c.checkpoint.init_from = str(tmp_path / "run"), init_from
  c.checkpoint.async_save, c.train.tensorboard = False, False
  c.train.steps, c.train.eval_every, c.optim.lr = 1, 0, 0.0
  return c


def test_stage_from_a_hub_id_takes_the_model_shape_from_the_checkpoint(tmp_path, monkeypatch):
  """The tiny config's model differs from the checkpoint's (tied, head_dim 32, llama3 rope,
  vocab 300): nothing is typed, so every weight field comes from config.json."""
  path = tmp_path / "hf"
  model = hf_models.build("llama3_2_tied", path)
  asked = []
  import huggingface_hub

  def fake_download(repo_id, allow_patterns):
    asked.append(repo_id)
    assert "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns
    assert {"generation_config.json", "chat_template.jinja"} <= set(allow_patterns)
    return str(path)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  c = _config(tmp_path, "some-org/llama-tiny")
  out = train.run(c)
  assert out["origin"] == "HF checkpoint some-org/llama-tiny" and asked
  m = c.model
  assert (m.vocab_size, m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.tie_embeddings,
          m.rope_type, m.rope_factor, m.rope_original_max_len, m.norm_eps) == \
      (300, 64, 4, 2, 32, 176, True, "llama3", 32.0, 32, 1e-6)
  assert (m.dtype, m.remat, m.scan_layers) == ("float32", "none", True)  # the run's own
  # lr 0: the trained params are the HF weights, laid out our way.
  params = out["state"]["params"]
  np.testing.assert_array_equal(np.asarray(params["embed"].get_value()),
                                model.model.embed_tokens.weight.detach().numpy())
  assert "lm_head" not in params
  wq = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # [H*E, D]
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["wq"].get_value())[1],
                                wq.T.reshape(64, 4, 32))


def test_a_stage_trains_from_gemma3(tmp_path):
  """Gemma 3 (q/k norms, post-norms, local and global layers with their own RoPE): the config
  comes from config.json, a training step runs (the window and the per-layer RoPE under the
  scanned layers and the gradient), and the params hold the HF tensors."""
  model = hf_models.build("gemma3", tmp_path / "hf")
  c = _config(tmp_path, str(tmp_path / "hf"))
  out = train.run(c)
  m, hf = c.model, model.config
  assert (m.sliding_window, m.layer_types) == (hf_models.WINDOW, tuple(
      "sliding" if t == "sliding_attention" else "full" for t in hf.layer_types))
  params = out["state"]["params"]["layers"]
  layer = model.model.layers[1]
  np.testing.assert_array_equal(np.asarray(params["attn"]["q_norm"]["scale"].get_value())[1],
                                layer.self_attn.q_norm.weight.detach().numpy())
  np.testing.assert_array_equal(np.asarray(params["mlp_post_norm"]["scale"].get_value())[1],
                                layer.post_feedforward_layernorm.weight.detach().numpy())


@pytest.fixture
def hf_dir(tmp_path):
  path = tmp_path / "hf"
  hf_models.build("mistral", path)  # untied, rms_norm_eps 1e-6, ffn 176
  return str(path)


def test_a_typed_model_field_that_contradicts_the_file_names_both(tmp_path, hf_dir):
  c = _config(tmp_path, hf_dir)
  c.model.ffn_dim = 128
  with pytest.raises(ValueError) as e:
    train.check_config(c, explicit={"model.ffn_dim"})
  msg = str(e.value)
  assert "model.ffn_dim=128" in msg and "176" in msg and os.path.join(hf_dir, "config.json") in msg
  # Not typed: the preset's value is not the user's, and the file's wins.
  c.model.ffn_dim = 128
  train.check_config(c)
  assert c.model.ffn_dim == 176 and c.model.preset == f"hf:{hf_dir}"


def test_typed_fields_that_agree_are_kept_with_float_tolerance(tmp_path, hf_dir):
  hf_models.build("mistral", hf_dir, rms_norm_eps=9.999999747378752e-06)  # as GGUF stores 1e-5
  c = _config(tmp_path, hf_dir)
  c.model.norm_eps, c.model.max_seq_len, c.model.scan_layers = 1e-5, 128, False
  c.model.rope_theta = 30000  # an int typed for a float field
  train.check_config(c, explicit={"model.norm_eps", "model.max_seq_len", "model.scan_layers",
                                  "model.rope_theta"})
  assert c.model.norm_eps == 9.999999747378752e-06  # the file's exact value
  assert (c.model.max_seq_len, c.model.scan_layers) == (128, False)  # shorter context is fine
  c.model.max_seq_len = 512
  with pytest.raises(ValueError, match=r"model.max_seq_len=512 contradicts .*256"):
    train.check_config(c, explicit={"model.max_seq_len"})
  c.model.max_seq_len, c.model.norm_eps = 256, 2e-5
  with pytest.raises(ValueError, match=r"model.norm_eps=2e-05 contradicts .*says 9.99999974737875"):
    train.check_config(c, explicit={"model.norm_eps"})


def test_placeholder_tokenizer_becomes_the_checkpoints_own(tmp_path, smollm2_dir):
  """The failure this fixes: `tokenizer ... has 49152 ids but model.vocab_size is 384`."""
  assert base.get_config().data.tokenizer in checkpoints.PLACEHOLDER_TOKENIZERS
  c = _config(tmp_path, str(smollm2_dir))
  assert c.data.tokenizer in checkpoints.PLACEHOLDER_TOKENIZERS
  train.check_config(c)
  assert c.data.tokenizer == str(smollm2_dir)
  assert (c.model.vocab_size, c.model.n_layers, c.model.tie_embeddings) == (49152, 30, True)
  assert load_tokenizer(c.data.tokenizer).vocab_size == c.model.vocab_size
  # A tokenizer the user typed stays theirs.
  c = _config(tmp_path, str(smollm2_dir))
  train.check_config(c, explicit={"data.tokenizer"})
  assert c.data.tokenizer == "byte"


def test_main_reads_the_typed_model_flags(tmp_path, hf_dir):
  env = subproc.jax_env()
  r = subprocess.run(
      [sys.executable, "-m", "stable_alignment_jax.main", "--config=configs/stage1.py:tiny",
       f"--config.checkpoint.init_from={hf_dir}", f"--config.checkpoint.dir={tmp_path / 'run'}",
       "--config.model.n_heads=2"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert r.returncode != 0
  assert "config.model.n_heads=2 contradicts" in r.stderr and "says 4" in r.stderr
  assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
  import huggingface_hub

  def offline(repo_id, allow_patterns):
    raise OSError("no network")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="'meta-llama/Llama-2-7b-hf'.*hub could not"):
    train.check_config(_config(tmp_path, "meta-llama/Llama-2-7b-hf"))
  assert checkpoints.resolve("random:tiny") == "random:tiny"

