"""The reward model: Bradley–Terry against numpy, last-token scoring, learning a marker."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import reward as reward_config
from stable_alignment_jax.training import reward
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset


def _np_bradley_terry(scores, ratings, mask):
  terms, right = [], []
  for b in range(scores.shape[0]):
    for i in range(scores.shape[1]):
      for j in range(scores.shape[1]):
        if mask[b, i] and mask[b, j] and ratings[b, i] > ratings[b, j]:
          d = scores[b, i] - scores[b, j]
          terms.append(np.log1p(np.exp(-d)))
          right.append(d > 0)
  return np.mean(terms), np.mean(right), len(terms)


def test_bradley_terry_matches_numpy():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 4)).astype(np.float32)
  ratings = rng.integers(1, 5, size=(5, 4)).astype(np.float32)  # ties included
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]],
                  np.float32)
  ratings[1, 2] = np.nan  # a padded slot's rating may be anything
  scores[1, 3] = np.nan
  loss, m = reward.bradley_terry(scores=jnp.asarray(scores), ratings=jnp.asarray(ratings),
                                 response_mask=jnp.asarray(mask))
  want_loss, want_acc, n = _np_bradley_terry(np.nan_to_num(scores), np.nan_to_num(ratings), mask)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(m["accuracy"]), want_acc, rtol=1e-6)
  assert float(m["pairs"]) == n > 5


def test_bradley_terry_hand_worked():
  # One pair, margin 0: log 2. Chosen-vs-rejected as HH-RLHF stores it (ratings 1, 0).
  loss, m = reward.bradley_terry(scores=jnp.array([[0.3, 0.3]]), ratings=jnp.array([[1.0, 0.0]]),
                                 response_mask=jnp.ones((1, 2)))
  assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
  assert float(m["accuracy"]) == 0.0


def test_score_reads_the_last_response_token():
  cfg = preset("tiny", vocab_size=64, dtype="float32")
  graphdef, trunk = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  head = {"w": jax.random.normal(jax.random.key(1), (cfg.dim,)), "b": jnp.float32(0.5)}
  params = {"trunk": trunk, "head": head}
  tokens = np.array([[1, 7, 8, 9, 2, 0, 0], [1, 5, 6, 2, 0, 0, 0]], np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0]], np.float32)
  got = np.asarray(reward.sequence_scores(graphdef, params, tokens, loss_mask))
  h = np.asarray(nnx.merge(graphdef, trunk).hidden(tokens)[0])
  want = [h[0, 4] @ np.asarray(head["w"]) + 0.5, h[1, 3] @ np.asarray(head["w"]) + 0.5]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  changed = tokens.copy()
  changed[:, 5:] = 33  # what follows the response (padding) cannot change its reward
  np.testing.assert_allclose(np.asarray(reward.sequence_scores(graphdef, params, changed,
                                                               loss_mask)), got, rtol=1e-6)


def _marker_examples(n, seed):
  """Two random lowercase replies per prompt; the preferred one carries a '#' somewhere."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
  word = lambda k: "".join(rng.choice(letters, size=k))
  out = []
  for _ in range(n):
    good, bad = word(int(rng.integers(6, 16))), word(int(rng.integers(6, 16)))
    at = int(rng.integers(0, len(good) + 1))
    good = good[:at] + "#" + good[at:]
    first = bool(rng.integers(2))
    out.append({"prompt": "Q: " + word(8) + "\nA: ",
                "responses": [good, bad] if first else [bad, good],
                "ratings": [1.0, 0.0] if first else [0.0, 1.0]})
  return out


def test_reward_model_learns_a_marker_preference(tmp_path):
  c = reward_config.get_config("tiny")
  for split, (n, seed) in {c.data.train_split: (512, 0), c.data.eval_split: (128, 1)}.items():
    with open(tmp_path / f"{split}.jsonl", "w") as f:
      for ex in _marker_examples(n, seed):
        f.write(json.dumps(ex) + "\n")
  c.data.source, c.data.data_dir = "jsonl", str(tmp_path)
  c.data.num_responses, c.data.max_len = 2, 48
  c.train.steps, c.train.eval_every, c.train.eval_batches = 60, 60, 8
  c.checkpoint.dir, c.checkpoint.async_save = str(tmp_path / "rm"), False
  c.train.tensorboard = False
  out = reward.run(c)
  assert out["eval"]["pairs"] == 128  # 8 batches of 16 held-out comparisons
  assert out["eval"]["accuracy"] >= 0.9, out["eval"]

  # The run directory loads back (as PPO reads it) to the same scores.
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, params = reward.load(c.checkpoint.dir, mesh=mesh)
  tokens = np.array([[1, 40, 41, 38, 42, 2, 0, 0]] * 8, np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1, 0, 0]] * 8, np.float32)
  want = reward.sequence_scores(out["graphdef"], out["state"]["params"], tokens, mask)
  np.testing.assert_allclose(np.asarray(reward.sequence_scores(graphdef, params, tokens, mask)),
                             np.asarray(want), rtol=1e-5)


def test_load_refuses_a_run_that_is_not_a_reward_model(tmp_path):
  (tmp_path / "run_config.json").write_text(json.dumps({"loss": {"name": "sa_cpo"}, "model": {}}))
  with pytest.raises(ValueError, match="not a reward-model run"):
    reward.load(str(tmp_path), mesh=sharding.make_mesh({"fsdp": -1}))


def test_reward_run_resumes_from_its_checkpoint(tmp_path):
  c = reward_config.get_config("tiny")
  c.checkpoint.dir, c.checkpoint.async_save, c.train.tensorboard = str(tmp_path / "rm"), False, False
  c.train.steps, c.train.eval_every, c.checkpoint.save_every = 2, 0, 2
  first = reward.run(c)
  c.train.steps = 3
  second = reward.run(c)
  assert (first["start"], second["start"]) == (0, 2)
  assert second["origin"].startswith("resumed")
  assert int(second["state"]["step"]) == 3 and np.isfinite(second["final"]["loss"])
  # step 2 as saved (what the second run resumed from) is the first run's final state
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  graphdef, abstract = reward.abstract_params(reward.ModelConfig.from_dict(c.model))
  mesh = sharding.make_mesh({"fsdp": -1})
  saved, step = checkpoints.restore_params(c.checkpoint.dir, abstract,
                                           sharding.state_shardings(abstract, mesh), step=2)
  assert step == 2
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(first["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(saved["head"]["w"]).sum()) > 0  # a trained head, not the zero init


def test_init_trunk_keeps_the_checkpoints_architecture_with_this_runs_remat():
  c = reward_config.get_config("tiny")
  c.model.remat, c.checkpoint.init_from = "full", "random:tiny:3"
  graphdef, params, origin = reward.init_trunk(c, sharding.make_mesh({"fsdp": -1}))
  cfg = nnx.merge(graphdef, params).cfg
  assert origin == "random:tiny:3" and cfg.remat == "full"
  assert cfg.vocab_size == preset("tiny").vocab_size != c.model.vocab_size  # the checkpoint's
