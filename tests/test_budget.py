"""Automatic micro-batching: the choice against hand-computed activation bytes, the cache size
read from sysfs, the planner fitting a batch HBM cannot hold whole, and the premise that makes
the choice free: split into micro-batches, a step makes the same update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import stage1, stage3
from stable_alignment_jax.training import budget, flops, optim, train
from stable_alignment_jax import plan
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import ModelConfig


def _tiny():
  c = stage1.get_config("tiny")
  c.data.batch_size, c.data.num_responses, c.data.max_len = 8, 2, 32
  return c


def _act(c, rows):
  cfg = ModelConfig.from_dict(c.model)
  return sum(budget.activation_bytes(cfg, rows, c.data.max_len, 1,
                                     c.train.logprob_chunk).values())


def test_fewest_micro_batches_that_fit_the_budget():
  c = _tiny()
  whole, half, quarter = _act(c, 16), _act(c, 8), _act(c, 4)
  assert whole > half > quarter
  one = {"data": 1}
  assert budget.accum_for_budget(c, float("inf"), one) == 1
  assert budget.accum_for_budget(c, whole, one) == 1
  assert budget.accum_for_budget(c, whole - 1, one) == 2
  assert budget.accum_for_budget(c, half - 1, one) == 4
  assert budget.accum_for_budget(c, 0, one) == 8  # nothing fits: one prompt per micro-batch


def test_micro_batches_split_over_the_data_parallel_devices():
  # 8 prompts x 2 responses over 4 devices: 1, 2 or 4 micro-batches keep 4+ rows each; 8
  # micro-batches would leave 2 sequences for 4 devices.
  assert budget.valid_accum_steps(8, 2, 4) == [1, 2, 4]
  assert budget.valid_accum_steps(6, 1, 1) == [1, 2, 3, 6]
  c = _tiny()
  c.data.batch_size, c.data.num_responses = 3, 1
  with pytest.raises(ValueError, match="do not split over 2"):
    budget.accum_for_budget(c, 0, {"data": 2})


def test_cache_size_is_read_from_sysfs(tmp_path):
  for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32M")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "size").write_text(size + "\n")
  assert budget.last_level_cache_bytes(str(tmp_path)) == 32 * 2**20
  assert budget.last_level_cache_bytes(str(tmp_path / "none")) == budget.CPU_CACHE_FALLBACK


def test_auto_on_cpu_uses_the_cache_budget_and_a_set_count_wins():
  c = _tiny()
  mesh = jax.make_mesh((1,), ("data",))
  c.optim.accum_steps = 0
  n, why = budget.auto_accum_steps(c, mesh)
  want = budget.accum_for_budget(
      c, budget.CPU_CACHE_FRACTION * budget.last_level_cache_bytes(), {"data": 1})
  assert n == want and "CPU cache" in why
  c.optim.accum_steps = 2
  assert budget.auto_accum_steps(c, mesh) == (2, "set by optim.accum_steps")


def test_planner_splits_a_batch_that_does_not_fit_hbm():
  c = stage3.get_config()
  c.data.batch_size = 256  # 7B, 256 prompts x K responses x max_len on 8 v5p chips
  c.optim.accum_steps = 0
  auto = plan.plan(c, flops.CHIPS["v5p"], 8)
  assert auto["accum_steps"] > 1 and auto["fits"]
  c.optim.accum_steps = 1
  whole = plan.plan(c, flops.CHIPS["v5p"], 8)
  assert not whole["fits"]
  # The auto choice is the fewest that fit: one step fewer would not.
  fewer = [a for a in budget.valid_accum_steps(256, c.data.num_responses, 8)
           if a < auto["accum_steps"]][-1]
  c.optim.accum_steps = fewer
  assert not plan.plan(c, flops.CHIPS["v5p"], 8)["fits"]


def test_micro_batches_make_the_same_update():
  c = _tiny()
  cfg = ModelConfig.from_dict(c.model)
  graphdef, params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  tx, _ = optim.make_optimizer(c.optim, 100)
  rng = np.random.default_rng(0)
  b, k, t = c.data.batch_size, c.data.num_responses, c.data.max_len
  mask = np.zeros((b, k, t), np.float32)
  mask[:, :, 8:] = 1
  batch = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (b, k, t)), jnp.int32),
           "loss_mask": jnp.asarray(mask), "ratings": jnp.asarray(rng.integers(1, 8, (b, k)),
                                                                  jnp.float32),
           "response_mask": jnp.ones((b, k), jnp.float32)}
  out = {}
  for accum in (1, 4):
    step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                                     table=train.loss_table(c.loss, []), accum_steps=accum,
                                     logprob_chunk=c.train.logprob_chunk))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    out[accum] = step(state, batch)
  (s1, m1), (s4, m4) = out[1], out[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b_ in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b_, atol=1e-6)


def test_a_negative_count_fails_before_compute():
  c = _tiny()
  c.optim.accum_steps = -1
  with pytest.raises(ValueError, match="accum_steps=-1"):
    train.check_config(c)
