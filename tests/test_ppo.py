"""PPO: GAE, the clipped losses and the KL penalty against numpy; learning and kill-resume."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ppo as ppo_config
from stable_alignment_jax.training import ppo
from stable_alignment_jax.training import ppo_losses as pl
from stable_alignment_jax.model import llama, logprobs
from stable_alignment_jax.model.presets import preset


# --- numpy references -------------------------------------------------------------------------

def _np_gae_episode(r, v, gamma, lam):
  """Textbook GAE over one episode that ends after its last step (terminal value 0)."""
  n = len(r)
  adv = np.zeros(n)
  for t in range(n):
    total, w = 0.0, 1.0
    for k in range(t, n):
      v_next = v[k + 1] if k + 1 < n else 0.0
      total += w * (r[k] + gamma * v_next - v[k])
      w *= gamma * lam
    adv[t] = total
  return adv, adv + v


def _np_gae(rewards, values, mask, gamma, lam):
  """Splits each row into its episodes (maximal runs of mask == 1) and solves them one by one."""
  adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    t = 0
    while t < rewards.shape[1]:
      if not mask[i, t]:
        t += 1
        continue
      end = t
      while end < rewards.shape[1] and mask[i, end]:
        end += 1
      a, r = _np_gae_episode(rewards[i, t:end], values[i, t:end], gamma, lam)
      adv[i, t:end], ret[i, t:end] = a, r
      t = end
  return adv, ret


def _hand_rollout():
  rng = np.random.default_rng(0)
  mask = np.array([
      [0, 0, 1, 1, 1, 1, 0, 0],  # prompt, a 4-token response, right padding
      [1, 1, 0, 1, 1, 1, 1, 0],  # two episodes in one row: a done after step 1
      [0, 1, 0, 0, 0, 0, 0, 0],  # a one-token episode
      [1, 1, 1, 1, 1, 1, 1, 1],  # runs to the end of the row
  ], np.float32)
  rewards = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_numpy_with_dones_and_padding(gamma, lam):
  rewards, values, mask = _hand_rollout()
  adv, ret = pl.gae(rewards=jnp.asarray(rewards), values=jnp.asarray(values),
                    mask=jnp.asarray(mask), gamma=gamma, lam=lam)
  want_adv, want_ret = _np_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_hand_worked():
  # One 2-step episode, gamma = lam = 1: A_1 = r_1 - V_1, A_0 = r_0 + r_1 - V_0.
  adv, ret = pl.gae(rewards=jnp.array([[0.0, 1.0, 5.0]]), values=jnp.array([[0.5, 0.25, 9.0]]),
                    mask=jnp.array([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
  np.testing.assert_allclose(np.asarray(adv), [[0.5, 0.75, 0.0]])
  np.testing.assert_allclose(np.asarray(ret), [[1.0, 1.0, 0.0]])


def test_clipped_losses_match_numpy():
  rng = np.random.default_rng(1)
  _, _, mask = _hand_rollout()
  shape = mask.shape
  old_logp = rng.normal(-2, 0.5, shape).astype(np.float32)
  logp = (old_logp + rng.normal(0, 0.4, shape)).astype(np.float32)  # ratios well beyond 1 +- 0.2
  adv = rng.normal(size=shape).astype(np.float32)
  values, old_values = rng.normal(size=(2,) + shape).astype(np.float32)
  returns = rng.normal(size=shape).astype(np.float32)
  eps, eps_v = 0.2, 0.3

  loss, m = pl.policy_loss(logp=logp, old_logp=old_logp, advantages=adv, mask=mask, cliprange=eps)
  ratio = np.exp(logp - old_logp)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
  sel = mask > 0
  np.testing.assert_allclose(float(loss), per[sel].mean(), rtol=1e-5)
  clipped = (-adv * np.clip(ratio, 1 - eps, 1 + eps)) > (-adv * ratio)
  np.testing.assert_allclose(float(m["pg_clipfrac"]), clipped[sel].mean(), rtol=1e-6)
  assert 0.1 < float(m["pg_clipfrac"]) < 0.9  # both branches are exercised

  vloss, vm = pl.value_loss(values=values, old_values=old_values, returns=returns, mask=mask,
                            cliprange_value=eps_v)
  v_clip = np.clip(values, old_values - eps_v, old_values + eps_v)
  vper = 0.5 * np.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
  np.testing.assert_allclose(float(vloss), vper[sel].mean(), rtol=1e-5)
  assert 0.0 < float(vm["vf_clipfrac"]) < 1.0


def test_whiten_and_last_index():
  x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  w = np.asarray(pl.whiten(jnp.asarray(x), jnp.asarray(mask)))
  vals = x[mask > 0]
  np.testing.assert_allclose(w[mask > 0], (vals - vals.mean()) / vals.std(), rtol=1e-4)
  assert np.all(w[mask == 0] == 0)
  np.testing.assert_array_equal(np.asarray(pl.last_index(jnp.asarray(mask))), [2, 1])


def test_adaptive_kl_coefficient_hand_worked():
  # KL 3x the target: error clipped to +0.2, so coef *= 1 + 0.2 * 100 / 1000.
  assert pl.adaptive_kl_coef(0.1, 18.0, target=6.0, horizon=1000, n_steps=100) == \
      pytest.approx(0.1 * 1.02)
  # KL at 5.4 of 6: error -0.1.
  assert pl.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=1000, n_steps=100) == \
      pytest.approx(0.1 * 0.99)
  assert pl.adaptive_kl_coef(0.1, 50.0, target=0.0, horizon=1000, n_steps=100) == 0.1


def test_kl_penalty_is_the_log_prob_difference_of_two_models():
  """Per-token penalties summed over a response = -coef * (log pi(y) - log pi_ref(y)), with the
  sequence log-probs computed by the trainer's own `model.logprobs.sequence_logprobs`."""
  cfg = preset("tiny", vocab_size=64, dtype="float32")
  pol = llama.Llama(cfg, rngs=nnx.Rngs(0))
  ref = llama.Llama(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 64, n).tolist() for n in (3, 5, 2)]
  responses = [rng.integers(3, 64, n).tolist() for n in (4, 1, 6)]
  tokens, mask = ppo.layout(prompts, responses, 12, pad_id=0)
  for i, (p, r) in enumerate(zip(prompts, responses)):  # the mask marks exactly the response
    assert tokens[i, 1:][mask[i] > 0].tolist() == r
  coef = 0.3
  logp = ppo.token_logprobs(pol, pol.hidden(tokens)[0], tokens, 0)
  ref_logp = ppo.token_logprobs(ref, ref.hidden(tokens)[0], tokens, 0)
  pen = np.asarray(pl.kl_penalty(logp=logp, ref_logp=ref_logp, mask=mask, coef=coef)).sum(-1)
  loss_mask = np.concatenate([np.zeros((3, 1), np.float32), mask], axis=1)
  seq_pol, _ = logprobs.sequence_logprobs(pol(tokens)[0], lambda x: x, tokens, loss_mask)
  seq_ref, _ = logprobs.sequence_logprobs(ref(tokens)[0], lambda x: x, tokens, loss_mask)
  np.testing.assert_allclose(pen, -coef * (np.asarray(seq_pol) - np.asarray(seq_ref)), rtol=1e-4,
                             atol=1e-5)
  # The KL estimate: sum of r - 1 - log r, r = pi_ref / pi; zero against itself.
  kl = np.asarray(pl.kl_estimate(logp=logp, ref_logp=ref_logp, mask=mask))
  lr = (np.asarray(ref_logp) - np.asarray(logp)) * mask
  np.testing.assert_allclose(kl, ((np.exp(lr) - 1 - lr) * mask).sum(-1), rtol=1e-5)
  assert np.all(kl > 0)
  np.testing.assert_allclose(np.asarray(pl.kl_estimate(logp=logp, ref_logp=logp, mask=mask)), 0)


def test_experience_in_chunks_equals_one_forward():
  """The rollout does not depend on how many rows a forward takes (rows keep their places)."""
  import functools
  import jax
  from stable_alignment_jax.model import sharding
  cfg = preset("tiny", vocab_size=64, dtype="float32")
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, policy = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  _, ref = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(1)), mesh)
  head = {"w": jnp.linspace(-1.0, 1.0, cfg.dim), "b": jnp.zeros(())}
  params = {"policy": policy, "value_head": head}
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 64, int(rng.integers(1, 6))).tolist() for _ in range(16)]
  responses = [rng.integers(3, 64, int(rng.integers(1, 8))).tolist() for _ in range(16)]
  tokens, mask = ppo.layout(prompts, responses, 14, pad_id=0)
  scores = rng.normal(size=16).astype(np.float32)
  run = lambda chunk: jax.jit(functools.partial(
      ppo.experience, graphdef=graphdef, gamma=1.0, lam=0.95, cliprange_reward=10.0,
      chunk=chunk))(params, ref, tokens, mask, scores, jnp.float32(0.1))
  with sharding.activate(mesh):
    (one, m1), (chunked, m2) = run(16), run(8)
  for k in one:
    np.testing.assert_allclose(np.asarray(chunked[k]), np.asarray(one[k]), rtol=1e-5, atol=1e-6)
  # and the log-probs are those of an unchunked, unsharded forward
  logp, values = ppo.policy_forward(graphdef, params, tokens)
  np.testing.assert_allclose(np.asarray(one["old_logp"]), np.asarray(logp) * mask, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(one["old_values"]), np.asarray(values) * mask,
                             rtol=1e-5, atol=1e-6)
  assert float(m1["kl"]) > 0 and abs(float(m1["kl"]) - float(m2["kl"])) < 1e-5


def test_chunked_log_probs_give_the_same_rollout_and_loss():
  """train.logprob_chunk in PPO: the rollout (policy and reference log-probs) and the PPO loss
  and its gradient equal the whole-logits path."""
  import functools
  import jax
  cfg = preset("tiny", vocab_size=64, dtype="float32")
  graphdef, policy = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  ref = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(1)))[1]
  params = {"policy": policy, "value_head": {"w": jnp.linspace(-1.0, 1.0, cfg.dim),
                                             "b": jnp.zeros(())}}
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, 64, int(rng.integers(1, 6))).tolist() for _ in range(8)]
  responses = [rng.integers(3, 64, int(rng.integers(1, 8))).tolist() for _ in range(8)]
  tokens, mask = ppo.layout(prompts, responses, 14, pad_id=0)
  scores = rng.normal(size=8).astype(np.float32)
  out = {}
  for lc in (0, 5):  # 13 scored positions: chunks of 5 leave a ragged end
    rollout, _ = jax.jit(functools.partial(
        ppo.experience, graphdef=graphdef, gamma=1.0, lam=0.95, cliprange_reward=10.0, chunk=8,
        logprob_chunk=lc))(params, ref, tokens, mask, scores, jnp.float32(0.1))
    loss = functools.partial(ppo.ppo_loss, graphdef=graphdef, cliprange=0.2,
                             cliprange_value=0.2, vf_coef=0.1, logprob_chunk=lc)
    shifted = dict(rollout, old_logp=rollout["old_logp"] - 0.05)  # a ratio away from 1
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, shifted)
    out[lc] = rollout, value, grads
  (r0, v0, g0), (r5, v5, g5) = out[0], out[5]
  for k in r0:
    np.testing.assert_allclose(np.asarray(r5[k]), np.asarray(r0[k]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v5, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g5), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_count_reward():
  got = ppo.token_count_reward([[1], [1]], [[5, 6, 5, 2], []], tokens=(5,), length_cost=0.25)
  np.testing.assert_allclose(got, [2 - 1.0, 0.0])


# --- runs -------------------------------------------------------------------------------------

def _tiny(tmp_path, name, **overrides):
  c = ppo_config.get_config("tiny")
  c.checkpoint.dir = str(tmp_path / name)
  c.checkpoint.async_save = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """ppo.py:tiny uninterrupted: 12 iterations, checkpoints every 4."""
  c = _tiny(tmp_path_factory.mktemp("ppo"), "full")
  return c, ppo.run(c)


def test_ppo_raises_the_reward_within_a_kl_bound(full_run):
  c, out = full_run
  h = out["history"]
  assert len(h) == c.train.steps == 12
  assert h[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as pi_ref
  first = np.mean([m["score"] for m in h[:3]])
  last = np.mean([m["score"] for m in h[-3:]])
  # 16 new tokens from 384 ids: a random policy scores about 16 * (26/384 - 0.1) = -0.5.
  assert first < 0.3, first
  assert last > first + 1.0, (first, last)
  kls = [m["kl"] for m in h]
  assert max(kls) < 16.0, kls  # nats per 16-token response
  assert all(np.isfinite(m["loss"]) for m in h)


def test_kill_resume_gives_the_same_rollouts_and_losses(full_run, tmp_path):
  c_full, out = full_run
  c = _tiny(tmp_path, "killed")
  stopped = ppo.run(c, stop_after=6)  # checkpoint at 4; iterations 5-6 are lost with the kill
  assert len(stopped["history"]) == 6
  resumed = ppo.run(c, stop_after=8)
  assert resumed["start"] == 4
  full = {m["step"]: m for m in out["history"]}
  for m in stopped["history"] + resumed["history"]:
    want = full[m["step"]]
    assert m["rollout_crc"] == want["rollout_crc"], m["step"]
    for k in ("loss", "pg_loss", "vf_loss", "score", "kl", "kl_coef"):
      assert m[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (m["step"], k)
  assert [m["step"] for m in resumed["history"]] == [5, 6, 7, 8]


def test_a_reward_model_scores_ppo_rollouts_on_hh_rlhf(shared_data, tmp_path):
  """HH-RLHF pairs (data_prep's reader) -> reward.py:tiny for a few steps -> ppo.py:tiny on the
  HH prompts with that reward model: PPO's scores are the reward model's on the rollouts."""
  from configs import reward as reward_config
  from data_prep import hh_rlhf
  from stable_alignment_jax.training import reward
  from stable_alignment_jax.model import sharding
  from stable_alignment_jax.data.tokenizer import ByteTokenizer

  examples, _, _, _ = hh_rlhf.read_file(str(shared_data / "hh_rlhf/harmless-base_test.jsonl.gz"),
                                        "harmless_base")
  data_dir = tmp_path / "hh"
  data_dir.mkdir()
  for split, part in (("train", examples[:400]), ("test", examples[400:600])):
    with open(data_dir / f"{split}.jsonl", "w") as f:
      for ex in part:
        f.write(json.dumps({k: ex[k] for k in ("prompt", "responses", "ratings")}) + "\n")
  rc = reward_config.get_config("tiny")
  rc.data.source, rc.data.data_dir, rc.data.eval_split = "jsonl", str(data_dir), "test"
  rc.data.num_responses, rc.data.max_len = 2, 256
  # Byte ids at max_len 256 keep only ~30% of HH (the data check would stop the run): this
  # test is about the wiring, so it takes the loss knowingly.
  rc.data.accept_length_loss = True
  rc.train.steps, rc.train.eval_every, rc.train.eval_batches = 4, 4, 1
  rc.checkpoint.dir, rc.checkpoint.async_save = str(tmp_path / "rm"), False
  rc.train.tensorboard = False
  reward.run(rc)

  c = _tiny(tmp_path, "ppo_hh", **{
      "data.source": "jsonl", "data.data_dir": str(data_dir), "reward.model": rc.checkpoint.dir,
      "ppo.max_prompt_len": 128, "ppo.rollout_batch": 16, "train.steps": 2,
      "data.accept_length_loss": True})
  out = ppo.run(c)
  last = out["last_rollout"]
  assert all(ByteTokenizer().decode(p).startswith("Human:") for p in last["prompts"])
  graphdef, params = reward.load(rc.checkpoint.dir, mesh=sharding.make_mesh({"fsdp": -1}))
  loss_mask = np.concatenate([np.zeros_like(last["mask"][:, :1]), last["mask"]], axis=1)
  want = np.asarray(reward.sequence_scores(graphdef, params, last["tokens"], loss_mask))
  np.testing.assert_allclose(last["scores"], want, rtol=1e-5, atol=1e-6)
  assert np.std(want) > 0  # the reward model tells the rollouts apart
  assert out["history"][-1]["score"] == pytest.approx(float(np.mean(want)), rel=1e-5)


@pytest.mark.slow
def test_ppo_iteration_on_smollm2_uses_the_real_models_log_probs(smollm2_dir, shared_data,
                                                                 tmp_path):
  """One PPO iteration from the real SmolLM2-135M-Instruct on HH prompts (its chat template):
  the rollout's old log-probs, which every PPO ratio starts from, are transformers' own."""
  import torch
  import transformers
  from data_prep import hh_rlhf

  examples, _, _, _ = hh_rlhf.read_file(str(shared_data / "hh_rlhf/harmless-base_test.jsonl.gz"),
                                        "harmless_base")
  data_dir = tmp_path / "hh"
  data_dir.mkdir()
  with open(data_dir / "train.jsonl", "w") as f:
    for ex in examples[:200]:
      f.write(json.dumps(ex) + "\n")
  c = _tiny(tmp_path, "smol", **{
      "data.source": "jsonl", "data.data_dir": str(data_dir), "data.tokenizer": str(smollm2_dir),
      "checkpoint.init_from": str(smollm2_dir), "ppo.rollout_batch": 8, "ppo.minibatch": 8,
      "ppo.epochs": 1, "ppo.max_prompt_len": 120, "train.steps": 1, "optim.lr": 1e-5,
      "reward.tokens": (30,)})
  out = ppo.run(c)
  (m,) = out["history"]
  assert m["kl"] == pytest.approx(0.0, abs=1e-6) and np.isfinite(m["loss"])
  last = out["last_rollout"]
  tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
  assert all("<|im_start|>assistant" in tok.decode(p) for p in last["prompts"])
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
  with torch.no_grad():
    logits = hf(torch.as_tensor(last["tokens"], dtype=torch.long)).logits
  want = torch.log_softmax(logits[:, :-1], -1).gather(
      -1, torch.as_tensor(last["tokens"][:, 1:, None], dtype=torch.long))[..., 0].numpy()
  mask = last["mask"] > 0
  assert mask.sum() > 8 * 4
  np.testing.assert_allclose(last["old_logp"][mask], want[mask], atol=2e-3)


def test_configs_build_and_refuse_unknown_args():
  from configs import reward as reward_config
  c = ppo_config.get_config()
  assert c.ppo.rollout_batch % c.ppo.minibatch == 0
  # TRLX's 6000 optimizer steps at epochs * rollout_batch / minibatch updates per iteration
  per_iteration = c.ppo.epochs * c.ppo.rollout_batch // c.ppo.minibatch
  assert c.train.steps == round(6000 / per_iteration)
  assert ppo_config.get_config("tiny").reward.model == ""
  assert reward_config.get_config("sandbox").data.num_responses == 3
  # Each says its method in its own block, no preference-loss tag.
  assert reward_config.get_config().method == "reward" and "loss" not in reward_config.get_config()
  assert c.method == "ppo" and "loss" not in c
  with pytest.raises(KeyError, match="unknown config arg"):
    ppo_config.get_config("tiny,big")


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path):
  """The tiny commands of configs/reward.py and configs/ppo.py, a few steps each, PPO scored
  by the reward model the first one trained."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rm = str(tmp_path / "rm")
  for cmd in (["stable_alignment_jax.training.reward", "--config=configs/reward.py:tiny",
               "--config.train.steps=4", "--config.train.eval_every=4",
               f"--config.checkpoint.dir={rm}"],
              ["stable_alignment_jax.training.ppo", "--config=configs/ppo.py:tiny",
               "--config.train.steps=2",
               f"--config.reward.model={rm}", f"--config.checkpoint.dir={tmp_path / 'ppo'}"]):
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
  assert '"step": 2' in out.stdout
