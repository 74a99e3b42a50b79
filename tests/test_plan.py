"""The planner's bytes against a real sharded state and a compiled step on 8 CPU devices."""

import dataclasses
import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import stage1, stage3
from stable_alignment_jax.training import flops, optim, train
from stable_alignment_jax import plan
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny(remat="none"):
  c = stage1.get_config("tiny")
  c.model.remat = remat
  c.data.batch_size, c.data.max_len = 16, 128
  return c


@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 8, "tensor": 1},
                                  {"data": 2, "fsdp": 2, "tensor": 2}])
def test_param_and_optimizer_bytes_equal_a_real_sharded_state(mesh):
  c = _tiny()
  cfg = ModelConfig.from_dict(c.model)
  m = sharding.make_mesh(mesh)
  _, params = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), m)
  tx, _ = optim.make_optimizer(c.optim, 100)
  opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, params), m)
  opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
  p = plan.plan(c, flops.CHIPS["v5p"], 8, mesh)["bytes_per_device"]
  # Every device holds the same amount, and it is what the planner says.
  assert set(sharding.per_device_bytes(params).values()) == {p["params"]}
  assert set(sharding.per_device_bytes(opt).values()) == {p["optimizer"]}


def test_activation_estimate_is_near_the_compiled_step_temp_bytes():
  # XLA:CPU schedules without regard to remat, so compare the no-remat estimate; the step
  # builds the whole logits, so the plan counts them whole.
  c = _tiny("none")
  c.train.logprob_chunk = 0
  cfg = ModelConfig.from_dict(c.model)
  mesh = sharding.make_mesh({"fsdp": 8})
  graphdef, params = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  tx, _ = optim.make_optimizer(c.optim, 100)
  state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.int32(0)}
  b, k, t = c.data.batch_size, c.data.num_responses, c.data.max_len
  host = {"tokens": np.zeros((b, k, t), np.int32), "loss_mask": np.ones((b, k, t), np.float32),
          "ratings": np.ones((b, k), np.float32), "response_mask": np.ones((b, k), np.float32)}
  batch = {n: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for n, v in host.items()}
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
      table=train.loss_table(c.loss, []), accum_steps=1))
  with sharding.activate(mesh):
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  p = plan.plan(c, flops.CHIPS["v5p"], 8, {"fsdp": 8})["bytes_per_device"]
  estimate = p["activations_layers"] + p["activations_logits"]
  assert 0.6 < estimate / temp < 1.5, (estimate, temp)


def test_chunked_logits_estimate_is_near_a_compiled_chunked_step():
  # A vocabulary large enough that the logits dominate: whole, they are 2 x 6 rows x 128 x 8192
  # x 4 B = 48 MiB per device; in chunks of 16 positions 6 MiB, next to ~4 MiB of layers.
  c = _tiny("none")
  c.model.vocab_size, c.train.logprob_chunk = 8192, 16
  cfg = ModelConfig.from_dict(c.model)
  mesh = sharding.make_mesh({"fsdp": 8})
  graphdef, params = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  b, k, t = c.data.batch_size, c.data.num_responses, c.data.max_len
  host = {"tokens": np.zeros((b, k, t), np.int32), "loss_mask": np.ones((b, k, t), np.float32)}
  batch = {n: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for n, v in host.items()}

  def grad(params, batch):
    def f(p):
      logp, n = train.response_logprobs(graphdef, p, batch, logprob_chunk=16)
      return -jnp.sum(logp) / jnp.sum(n)
    return jax.grad(f)(params)

  with sharding.activate(mesh):
    temp = jax.jit(grad).lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  p = plan.plan(c, flops.CHIPS["v5p"], 8, {"fsdp": 8})["bytes_per_device"]
  assert p["activations_logits"] == 2 * 6 * 16 * 8192 * 4
  estimate = p["activations_layers"] + p["activations_logits"]
  assert 0.6 < estimate / temp < 1.5, (estimate, temp)
  c.train.logprob_chunk = 0  # the whole logits would not be near it
  whole = plan.plan(c, flops.CHIPS["v5p"], 8, {"fsdp": 8})["bytes_per_device"]
  assert (whole["activations_layers"] + whole["activations_logits"]) / temp > 2


def test_7b_fsdp_divides_params_and_moments():
  c = stage3.get_config()
  p = plan.plan(c, *plan.parse_hardware("v5p-64"))
  n = ModelConfig.from_dict(c.model).num_params()
  assert p["devices"] == 32 and p["mesh"] == {"data": 1, "fsdp": 32, "tensor": 1}
  # f32 params: 4 bytes each; only the RMSNorm scales (65 x 4096) are replicated.
  replicated = (2 * 32 + 1) * 4096 * 4
  assert p["bytes_per_device"]["params"] == pytest.approx((4 * n - replicated) / 32 + replicated)
  assert p["bytes_per_device"]["optimizer"] == pytest.approx(2 * p["bytes_per_device"]["params"],
                                                             abs=64)
  assert p["fits"] and 0 < p["mfu"] <= plan.ACHIEVABLE + 1e-9


def test_flops_follow_palm_and_remat():
  cfg = ModelConfig.from_dict(dict(_tiny().model))
  n = cfg.num_params() - cfg.vocab_size * cfg.dim
  model, hw = flops.step_flops(cfg, 1000, 100, reference=False)
  assert model == hw == 6 * n * 1000 + 12 * cfg.n_layers * cfg.dim * 100 * 1000
  full = dict(_tiny("full").model)
  model_f, hw_f = flops.step_flops(ModelConfig.from_dict(full), 1000, 100, reference=False)
  assert model_f == model and hw_f == pytest.approx(model * 4 / 3)
  # LoRA: a frozen base gets no weight gradients, 4 N per token for the weights (not 6 N)
  lora_model, _ = flops.step_flops(cfg, 1000, 100, reference=False, frozen_base=True)
  assert lora_model == 4 * n * 1000 + 12 * cfg.n_layers * cfg.dim * 100 * 1000


def test_a_tied_head_is_still_a_matmul():
  # Tying shares the table, not the work: the head's [D, V] matmul runs either way, so the
  # same shape must cost the same FLOPs tied or not (only the input lookup is free).
  cfg = ModelConfig.from_dict(dict(_tiny().model))
  tied = ModelConfig.from_dict({**dict(_tiny().model), "tie_embeddings": True})
  assert tied.num_params() == cfg.num_params() - cfg.vocab_size * cfg.dim
  assert flops.step_flops(tied, 1000, 100, reference=False) == \
      flops.step_flops(cfg, 1000, 100, reference=False)


def test_hardware_and_mesh_parsing_errors():
  assert plan.parse_hardware("v4-32")[1] == 16 and plan.parse_hardware("h100x8")[1] == 8
  for bad in ("v5p-63", "tpu", "a100x8"):
    with pytest.raises(ValueError, match="--hardware"):
      plan.parse_hardware(bad)
  c = _tiny()
  with pytest.raises(ValueError, match="not divisible"):
    plan.plan(c, flops.CHIPS["v4"], 3, {"fsdp": -1})


def test_cli_prints_a_plan():
  out = subprocess.run([sys.executable, "-m", "stable_alignment_jax.plan",
                        "--config=configs/stage3.py", "--hardware=v5p-64,h100x8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "TPU v5p x32" in out.stdout and "H100 SXM x8" in out.stdout and "MFU" in out.stdout


def test_one_chip_table_serves_the_planner_and_the_trainers_mfu():
  assert flops.peak_flops("TPU v5 lite") == flops.CHIPS["v5e"].peak_bf16 == 197e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12 and flops.CHIPS["h200"].hbm == 141e9
  assert flops.peak_flops("TPU v5p") == plan.parse_hardware("v5p-8")[0].peak_bf16
  assert flops.peak_flops("cpu") == 0.0  # unknown chips report no MFU rather than a wrong one


def test_plan_reports_the_data_length_percentiles_the_trainer_would():
  from stable_alignment_jax.data import synthetic
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  c = stage1.get_config("tiny")
  c.data.max_len = 120  # most synthetic rows (up to ~139 tokens) do not fit whole
  out = plan.data_report(c)
  # The same figures, computed here from the examples with the byte tokenizer by hand.
  tok = load_tokenizer("byte")
  exs = synthetic.examples(c.data.synthetic_examples, seed=c.seed,
                           num_responses=max(c.data.num_responses, 2))
  rows = [1 + len(tok.encode(e["prompt"] + r)) + 1 for e in exs for r in e["responses"]]
  resp = [len(tok.encode(r)) + 1 for e in exs for r in e["responses"]]
  q = lambda v, p: int(np.quantile(v, p / 100, method="higher"))
  assert f"responses {q(resp, 50)}/{q(resp, 95)}/{q(resp, 99)}" in out
  assert f"max_len={q(rows, 99)} keeps 99%" in out
  assert f"{sum(r > 120 for r in rows)} of {len(rows)} responses left out" in out
  assert "a run would stop" in out


def test_flops_count_local_attention_over_its_window_and_the_attention_width():
  """A sliding layer's queries read `window` keys, not the sequence; the attention term's width
  is H*E (Gemma 2 2B: 8 x 256 = 2048 beside dim 2304); soft-capping adds no model FLOPs."""
  from stable_alignment_jax.model.presets import preset
  cfg = preset("gemma2_2b", remat="none")
  n = cfg.num_params()  # tied: the head is the only use of the table as a matmul
  seq, tokens = 8192, 1000
  model, _ = flops.step_flops(cfg, tokens, seq, reference=False)
  keys = 13 * 4096 + 13 * 8192  # alternating local (window 4096) and global layers
  assert model == 6 * n * tokens + 12 * 8 * 256 * keys * tokens
  # below the window every layer reads the whole sequence
  short, _ = flops.step_flops(cfg, tokens, 1024, reference=False)
  assert short == 6 * n * tokens + 12 * 2048 * 26 * 1024 * tokens
  uncapped = dataclasses.replace(cfg, attn_softcap=0.0, final_softcap=0.0)
  assert flops.step_flops(uncapped, tokens, seq, reference=False)[0] == model


def test_plan_takes_a_family_preset():
  from stable_alignment_jax.model.presets import preset
  c = plan.with_preset(_tiny(), "qwen3_0_6b")
  assert c.model.preset == "qwen3_0_6b" and c.model.remat == _tiny().model.remat
  cfg = ModelConfig.from_dict(c.model)
  assert cfg == preset("qwen3_0_6b", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       remat=cfg.remat, scan_layers=cfg.scan_layers)
  p = plan.plan(c, flops.CHIPS["h100"], 8)
  assert p["num_params"] == cfg.num_params()


# --- the method block and LoRA / QLoRA bytes, against hand counts on the tiny preset -----------
# tiny (configs/base.tiny): V=384, D=64, L=2, H=4, K=2, E=16, F=176, untied head, float32.
_TINY_PARAMS = (2 * 384 * 64  # embedding + head
                + 2 * (64 * 16 * (4 + 2 + 2 + 4) + 3 * 64 * 176 + 2 * 64)  # layers
                + 64)  # final norm
_TINY_TARGET_ELEMS = 2 * (64 * 16 * (4 + 2 + 2 + 4) + 3 * 64 * 176)  # q,k,v,o,gate,up,down


def _one_device(c):
  return plan.plan(c, flops.CHIPS["h100"], 1)


def test_plan_reads_the_method_block_of_reward_and_ppo_configs():
  from configs import dpo, ppo, reward
  assert ModelConfig.from_dict(_tiny().model).num_params() == _TINY_PARAMS == 141632
  model, head = 4 * _TINY_PARAMS, 4 * (64 + 1)
  r = _one_device(reward.get_config("tiny"))
  m = r["bytes_per_device"]
  assert (m["params"], m["gradients"], m["reference"], m["reward_model"]) == \
      (model + head, model + head, 0, 0)
  assert m["optimizer"] == pytest.approx(2 * (model + head), abs=64)  # Adam's mu and nu
  assert r["tokens_per_step"] == 16 * 3 * 160 and r["accum_steps"] == 1
  c = ppo.get_config("tiny")
  p = _one_device(c)["bytes_per_device"]
  assert (p["params"], p["reference"], p["reward_model"]) == (model + head, model, 0)
  c.reward.model = "runs/reward"  # scored by a reward model: its trunk and head are held too
  p = _one_device(c)
  assert p["bytes_per_device"]["reward_model"] == model + head
  assert p["tokens_per_step"] == c.ppo.minibatch * (c.ppo.max_prompt_len + c.ppo.max_new_tokens)
  d = dpo.get_config("tiny")
  assert _one_device(d)["bytes_per_device"]["reference"] == model
  # The paper-scale configs plan too (they have no loss block: the bug was reading it).
  for cfg in (reward.get_config(), ppo.get_config()):
    assert plan.plan(cfg, *plan.parse_hardware("v5p-64"))["fits"]


@pytest.mark.parametrize("quantize,base_bytes", [
    ("", 4 * _TINY_PARAMS),
    # targeted weights: bits/8 a weight + one f32 scale per 64; the rest (embedding, head,
    # norms) stay float32
    ("int8", _TINY_TARGET_ELEMS + _TINY_TARGET_ELEMS // 64 * 4
     + 4 * (_TINY_PARAMS - _TINY_TARGET_ELEMS)),
    ("nf4", _TINY_TARGET_ELEMS // 2 + _TINY_TARGET_ELEMS // 64 * 4
     + 4 * (_TINY_PARAMS - _TINY_TARGET_ELEMS))])
def test_lora_and_qlora_bytes_equal_a_hand_count(quantize, base_bytes):
  from configs import dpo
  c = plan.with_lora(dpo.get_config("tiny"), 4, quantize)
  m = _one_device(c)["bytes_per_device"]
  # r=4 adapters, float32: A [in, r] and B [r, out] per target and layer
  adapters = 4 * 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 176))
  assert m["params"] == m["gradients"] == adapters
  assert m["optimizer"] == pytest.approx(2 * adapters, abs=64)
  assert m["frozen_base"] == base_bytes
  if quantize != "nf4":  # the trainer's own frozen tree (numpy keeps a byte per uint4 code)
    from stable_alignment_jax.training import budget
    from stable_alignment_jax.model import lora
    g = lora.graphs(ModelConfig.from_dict(c.model), lora.LoraConfig.from_config(c.lora))
    assert budget.leaf_bytes_per_device(g.frozen, {"data": 1, "fsdp": 1, "tensor": 1})[0] == \
        base_bytes
  assert m["reference"] == 0  # the reference is the base with the adapters off
  # model/lora.py quantizes every projection of the base, whichever ones carry adapters
  with c.unlocked():
    c.lora.targets = ("q_proj",)
  q_only = _one_device(c)["bytes_per_device"]
  assert q_only["frozen_base"] == base_bytes and q_only["params"] == 4 * 2 * 4 * (64 + 64)
  full = _one_device(plan.with_lora(c, 0))["bytes_per_device"]
  assert full["frozen_base"] == 0 and full["reference"] == full["params"] == 4 * _TINY_PARAMS


def test_lora_table_cli_prints_every_variant_and_the_verdict():
  out = subprocess.run([sys.executable, "-m", "stable_alignment_jax.plan",
                        "--config=configs/stage3.py", "--model=llama3_1_8b", "--lora_table=16",
                        "--hardware=h100x1", "--data_lengths=false"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| h100x1")]
  assert [r.split("|")[2].strip() for r in rows] == \
      ["full", "LoRA r=16", "QLoRA int8 r=16", "QLoRA nf4 r=16"]
  assert rows[0].rstrip(" |").endswith("NO") and rows[-1].rstrip(" |").endswith("yes")
