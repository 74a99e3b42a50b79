"""One checkpoint format: a real training run exports to Hugging Face, an HF model imports to a
run directory, and both load through `checkpoints.load_model`, with equal logits throughout."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import subproc
from configs import stage1
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.training import train
from stable_alignment_jax.model import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENS = np.random.RandomState(0).randint(3, 259, (2, 24))


def _logits(graphdef, state):
  return np.asarray(nnx.merge(graphdef, state)(jnp.asarray(TOKENS))[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A `configs/stage1.py:tiny` run directory after 3 steps (weights moved off the init)."""
  c = stage1.get_config("tiny")
  c.checkpoint.dir = str(tmp_path_factory.mktemp("stage1") / "run")
  c.checkpoint.async_save, c.train.tensorboard = False, False
  c.train.steps, c.train.eval_every = 3, 0
  train.run(c)
  return c.checkpoint.dir


def test_training_run_exports_to_hf_and_back_with_equal_logits(trained, tmp_path):
  env = subproc.jax_env()
  hf_dir = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "stable_alignment_jax.model.convert",
                      f"--from={trained}", f"--to_hf={hf_dir}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  ours = _logits(*checkpoints.load_model(trained, dtype="float32"))
  # The exported directory is a plain HF LLaMA: transformers computes the same logits.
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  gen = json.loads((hf_dir / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)  # the byte tokenizer's ids
  # HF -> run directory -> load_model: the same weights, read the way every tool reads them.
  graphdef, state = checkpoints.load_hf(str(hf_dir), dtype="float32")
  run_dir = checkpoints.save_model(nnx.merge(graphdef, state).cfg, state, str(tmp_path / "run"),
                                   source=str(hf_dir))
  run = checkpoints.read_run_config(run_dir)
  assert run["source"] == str(hf_dir) and run["model"]["vocab_size"] == 384
  np.testing.assert_array_equal(_logits(*checkpoints.load_model(run_dir, dtype="float32")), ours)
  # ... and out again: the same tensors as the first export.
  checkpoints.export_hf(run_dir, str(tmp_path / "hf2"))
  a = convert.load_hf(str(hf_dir), dtype="float32")[1]
  b = convert.load_hf(str(tmp_path / "hf2"), dtype="float32")[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_imported_model_is_an_init_from_for_training(trained, tmp_path):
  graphdef, state = checkpoints.load_model(trained, dtype="float32")
  run_dir = checkpoints.save_model(nnx.merge(graphdef, state).cfg, state, str(tmp_path / "m"))
  c = stage1.get_config("tiny")
  c.checkpoint.dir, c.checkpoint.init_from = str(tmp_path / "next"), run_dir
  c.checkpoint.async_save, c.train.tensorboard = False, False
  c.train.steps, c.train.eval_every, c.optim.lr = 1, 0, 0.0
  out = train.run(c)
  assert out["origin"] == f"{run_dir} (step 0)"
  np.testing.assert_array_equal(_logits(graphdef, out["state"]["params"]),
                                _logits(graphdef, state))


def test_save_model_refuses_a_directory_with_a_checkpoint(trained):
  graphdef, state = checkpoints.load_model(trained, dtype="float32")
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    checkpoints.save_model(nnx.merge(graphdef, state).cfg, state, trained)
