"""rlhf.run_baseline: reward model then PPO from one start, a loadable policy, skip on re-run."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import ppo as ppo_config
from configs import reward as reward_config
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.training import ppo, reward
from stable_alignment_jax.recipes import rlhf
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset


def _groups(n, seed):
  """Imitation-style groups: 3 replies per question, those with a '#' rated 6, the rest 2."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghij "))
  word = lambda k: "".join(rng.choice(letters, size=k))
  out = []
  for _ in range(n):
    replies = [word(int(rng.integers(4, 9))) for _ in range(3)]
    good = int(rng.integers(3))
    replies[good] = "#" + replies[good]
    out.append({"prompt": "Q: " + word(6) + "\nA: ", "responses": replies,
                "ratings": [6.0 if i == good else 2.0 for i in range(3)]})
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rlhf")
  with open(root / "train.jsonl", "w") as f:
    for ex in _groups(32, 0):
      f.write(json.dumps(ex) + "\n")
  # The start: a random tiny LM saved as a run directory that names its tokenizer ("byte"),
  # as the pipeline's society LM does.
  cfg = preset("tiny", vocab_size=384, dim=32, ffn_dim=64, max_seq_len=128, dtype="float32")
  start_params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))[1]
  start = checkpoints.save_model(cfg, start_params, str(root / "start"), tokenizer="byte")

  rc = reward_config.get_config("society")
  rc.data.tokenizer = "meta-llama/Llama-2-7b-hf"  # a placeholder: the start's must replace it
  rc.data.max_len, rc.data.batch_size = 48, 8  # the 8 test devices
  rc.train.steps, rc.train.eval_every, rc.train.eval_holdout = 6, 6, 0.25
  pc = ppo_config.get_config("society")
  pc.data.tokenizer = "meta-llama/Llama-2-7b-hf"
  pc.train.steps = 2
  pc.ppo.rollout_batch, pc.ppo.minibatch, pc.ppo.epochs = 8, 8, 1
  pc.ppo.max_prompt_len, pc.ppo.max_new_tokens = 16, 8
  pc.optim.lr = 1e-3  # a visible change of the policy in two iterations
  for c in (rc, pc):
    c.checkpoint.async_save, c.train.tensorboard = False, False
    c.checkpoint.save_every = 2
  kw = dict(data_dir=str(root), dataset="", tokenizer="", start=start,
            reward_dir=str(root / "reward"), ppo_dir=str(root / "ppo"), seed=0, source="jsonl")
  out = rlhf.run_baseline(rc, pc, **kw)
  return {"root": root, "out": out, "kw": kw, "cfgs": (rc, pc), "start": start, "cfg": cfg,
          "start_params": start_params}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_policy_dir_loads_as_eval_loads_it_with_the_ppo_runs_policy(setup):
  out, root = setup["out"], setup["root"]
  assert out["dir"] == os.path.join(str(root / "ppo"), rlhf.POLICY)
  graphdef, params = checkpoints.load_model(out["dir"])  # what eval/run.py calls
  assert nnx.merge(graphdef, params).cfg.vocab_size == 384  # the start's, not the config's 512
  # The PPO run directory's own latest {policy, value_head}, restored independently.
  cfg = setup["cfg"]
  _, abstract_policy = reward.abstract_trunk(cfg)
  abstract = {"policy": abstract_policy, "value_head": reward.abstract_head(cfg.dim)}
  saved, step = checkpoints.restore_params(
      out["ppo"]["run_dir"], abstract,
      sharding.state_shardings(abstract, sharding.make_mesh({"fsdp": -1})))
  assert step == 2
  for a, b in zip(_leaves(params), _leaves(saved["policy"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(_leaves(params), _leaves(setup["start_params"])))  # PPO moved it
  assert checkpoints.read_run_config(out["dir"])["data"]["tokenizer"] == "byte"


def test_both_parts_start_from_the_start_with_its_tokenizer_and_prompt_format(setup):
  out = setup["out"]
  for run_dir in (out["reward"]["dir"], out["ppo"]["run_dir"]):
    run = checkpoints.read_run_config(run_dir)
    assert run["checkpoint"]["init_from"] == setup["start"]
    assert run["data"]["tokenizer"] == "byte"  # filled from the start's run_config.json
    assert run["model"]["vocab_size"] == 384
  assert out["reward"]["data"]["prompt_format"] == "alpaca"  # auto, plain tokenizer
  # 8 of 32 groups held out; each has 2 differently rated pairs (the '#' reply over each other).
  assert out["reward"]["data"]["kept"] == 24
  assert out["reward"]["eval"]["pairs"] == 16
  assert 0.0 <= out["reward"]["eval"]["accuracy"] <= 1.0
  assert out["reward"]["steps"] == 6
  assert [h["step"] for h in out["ppo"]["history"]] == [1, 2]
  assert np.isfinite(out["ppo"]["final"]["score"]) and "kl" in out["ppo"]["final"]
  json.dumps(out)  # the pipeline's step ledger stores it


def test_a_second_call_trains_nothing_and_returns_the_same(setup, monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("retrained a finished part")
  monkeypatch.setattr(reward, "run", refuse)
  monkeypatch.setattr(ppo, "run", refuse)
  rc, pc = setup["cfgs"]
  assert rlhf.run_baseline(rc, pc, **setup["kw"]) == setup["out"]


def test_killed_after_ppo_before_the_export_resumes_to_the_same_policy(setup, monkeypatch):
  out, rc, pc = setup["out"], *setup["cfgs"]
  before = _leaves(checkpoints.load_model(out["dir"])[1])
  os.remove(os.path.join(out["ppo"]["run_dir"], rlhf.SUMMARY))
  shutil.rmtree(out["dir"])
  os.makedirs(out["dir"] + ".partial")  # a half-written export is cleared, not trusted
  monkeypatch.setattr(reward, "run", lambda *a, **k: pytest.fail("reward part was finished"))
  again = rlhf.run_baseline(rc, pc, **setup["kw"])
  assert again["ppo"]["history"] == out["ppo"]["history"]  # from metrics.jsonl, no new rollouts
  assert again["ppo"]["origin"].startswith("resumed")
  assert not os.path.exists(out["dir"] + ".partial")
  for a, b in zip(_leaves(checkpoints.load_model(again["dir"])[1]), before):
    np.testing.assert_array_equal(a, b)
