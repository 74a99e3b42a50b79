"""Mixtures of data kinds: the loss picked per example, the mixing proportions, exact resume,
and the configs of both recipes (staged with replay, the authors' mixed run)."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stable_alignment_jax.data import loader as data
from stable_alignment_jax.training import train
from stable_alignment_jax.data.tokenizer import load_tokenizer
from test_losses import make_case, np_logprobs, np_prompt_view, np_sa_cpo, np_sft

BYTE = load_tokenizer("byte")
LOSS = ml_collections.ConfigDict(dict(
    name="sa_cpo", ratio=0.2, margin=10.0, rating_scale=7.0, aggregate="mean",
    hinge="per_pair", sft_responses="best", beta=0.1, rank_weight=1.0,
    by_kind={"self_critic": "sft"}))


def _logp(logits, batch):
  b, k, t = batch["tokens"].shape
  logp, n = np_logprobs(logits, batch["tokens"].reshape(b * k, t),
                        batch["loss_mask"].reshape(b * k, t))
  return jnp.asarray(logp.reshape(b, k)), jnp.asarray(n.reshape(b, k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_batch_picks_the_loss_of_each_example(seed):
  logits, batch = make_case(seed, 6, 3, "mixed")
  kinds = ["imitation", "self_critic"]
  kind = np.random.default_rng(seed).permutation([0, 0, 0, 1, 1, 0]).astype(np.int32)
  batch["kind"] = kind
  table = train.loss_table(LOSS, kinds)
  assert [(name, idx) for name, _, idx in table] == [("sa_cpo", (0,)), ("sft", (1,))]
  logp, n = _logp(logits, batch)
  loss, metrics = train.loss_by_kind(logp, n, batch, table)
  prompts = np_prompt_view(logits, batch)
  cpo = [p for p, k in zip(prompts, kind) if k == 0]
  sft = [p for p, k in zip(prompts, kind) if k == 1]
  want_cpo, _ = np_sa_cpo(cpo, 0.2, 10.0, 7.0, "mean", "per_pair")
  want_sft, _ = np_sft(sft, "best")
  # Each example its own loss: the batch loss is the mean over examples of those losses.
  want = (len(cpo) * want_cpo + len(sft) * want_sft) / len(prompts)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/sa_cpo"]), want_cpo, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/sft"]), want_sft, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["share/sft"]), len(sft) / len(prompts), rtol=1e-6)


def test_one_loss_for_every_kind_is_that_loss_alone():
  logits, batch = make_case(5, 4, 3, "random")
  batch["kind"] = np.array([0, 1, 2, 1], np.int32)
  lc = ml_collections.ConfigDict(LOSS.to_dict())
  lc.by_kind = {}
  table = train.loss_table(lc, ["imitation", "self_critic", "realignment"])
  assert len(table) == 1
  logp, n = _logp(logits, batch)
  loss, _ = train.loss_by_kind(logp, n, batch, table)
  want, _ = np_sa_cpo(np_prompt_view(logits, batch), 0.2, 10.0, 7.0, "mean", "per_pair")
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_bad_loss_in_by_kind_fails_before_anything_loads():
  lc = ml_collections.ConfigDict(LOSS.to_dict())
  lc.by_kind = {"self_critic": "sftt"}
  with pytest.raises(KeyError, match="sftt"):
    train.loss_table(lc, ["self_critic"])


# --- the mixture loader -----------------------------------------------------------------------

def _group(kind, n):
  # The first rating says which example it is; the prompt says its kind.
  return [{"prompt": f"{kind} {i}?", "responses": [f"a{i}", "b"], "ratings": [float(i), -1.0]}
          for i in range(n)]


def _mixture(weights=(3.0, 1.0), sizes=(40, 9)):
  return data.Mixture((("self_critic", _group("self_critic", sizes[0]), weights[0]),
                       ("imitation", _group("imitation", sizes[1]), weights[1])), 0)


def _loader(mix, **kw):
  args = dict(global_batch_size=4, max_len=48, num_responses=2, seed=7, shard_index=0,
              shard_count=1)
  return data.make_loader(mix, BYTE, **{**args, **kw})


def test_mixture_proportions_and_kinds_over_an_epoch():
  loader = _loader(_mixture())
  assert loader.stats["kinds"] == ["self_critic", "imitation"]
  # An epoch is one pass over the first entry (the stage's own data): 40 / (3/4) draws.
  assert loader.stats["epoch_examples"] == pytest.approx(40 / 0.75)
  it = iter(loader)
  n_batches = 40
  kinds, seen = [], {0: [], 1: []}
  for _ in range(n_batches):
    b = next(it)
    for k, tok, r in zip(b["kind"], b["tokens"][:, 0], b["ratings"][:, 0]):
      kinds.append(int(k))
      prompt = bytes(int(x) - 3 for x in tok if x >= 3).decode()
      assert prompt.startswith(loader.stats["kinds"][k])  # the kind travels with its example
      seen[int(k)].append(int(r))
  share = np.mean(np.asarray(kinds) == 1)
  n = len(kinds)
  # Binomial sampling error at p = 1/4 over n draws; the interleave is exact, well inside it.
  assert abs(share - 0.25) <= 3 * np.sqrt(0.25 * 0.75 / n)
  # Each entry cycles through all its examples, epoch after epoch.
  assert set(seen[1]) == set(range(9)) and set(seen[0]) == set(range(40))
  assert sorted(seen[1][:9]) == list(range(9))


def test_resume_inside_a_mixture_is_exact():
  mix = _mixture()
  it = iter(_loader(mix))
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(5)]
  fresh = iter(_loader(mix))
  fresh.set_state(state)
  got = [next(fresh) for _ in range(5)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_one_entry_mixture_reads_like_its_source():
  src = _group("imitation", 12)
  plain = iter(_loader(src))
  mix = iter(_loader(data.Mixture((("imitation", src, 1.0),))))
  for _ in range(6):
    a, b = next(plain), next(mix)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert "kind" not in a and (b["kind"] == 0).all()


def test_open_mixture_from_config(tmp_path):
  for kind, n in (("self_critic", 10), ("imitation", 6), ("realignment", 5)):
    d = tmp_path / kind
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _group(kind, n)))
  dc = ml_collections.ConfigDict(dict(
      source="jsonl", dataset="", data_dir=str(tmp_path / "self_critic"), train_split="train",
      eval_split="validation", chain_of_hindsight=False, mixture={
          "self_critic": {"weight": 0.75},
          "imitation": {"weight": 0.25, "data_dir": str(tmp_path / "imitation")},
          "realignment": {"weight": 0.0, "data_dir": str(tmp_path / "realignment")}}))
  mix = data.open_mixture(dc, "train", 0)
  assert mix.kinds == ["imitation", "self_critic"]  # name order; weight 0 left out
  assert mix.epoch_entry == 1  # the entry that is data.dataset / data_dir itself
  assert [len(src) for _, src, _ in mix.entries] == [6, 10]
  dc.mixture.imitation.oops = 1
  with pytest.raises(ValueError, match="mixture.imitation: unknown keys"):
    data.open_mixture(dc, "train", 0)


# --- the recipes' configs ---------------------------------------------------------------------

def test_staged_configs_replay_by_default_and_mixed_is_five_one_one():
  from configs import common, mixed, pipeline, stage2, stage3
  s2, s3 = stage2.get_config(), stage3.get_config()
  w = lambda c: {k: v.weight for k, v in c.data.mixture.items()}
  assert common.REPLAY_SHARE > 0
  assert w(s2) == {"self_critic": 1 - common.REPLAY_SHARE, "imitation": common.REPLAY_SHARE}
  assert w(s3)["realignment"] == 1 - common.REPLAY_SHARE
  assert w(s3)["imitation"] == w(s3)["self_critic"] == common.REPLAY_SHARE / 2
  assert w(stage3.get_config("replay=0")) == {"realignment": 1.0}
  assert s2.loss.by_kind.self_critic == "sft" and s2.loss.name == "sa_cpo"
  m = mixed.get_config()
  assert w(m) == {"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}
  assert m.loss.hinge == "after_aggregate" and not m.loss.by_kind
  p = pipeline.get_config("tiny")
  assert "mixed" in p.baselines and p.rlhf.enabled
  assert w(p.stages.stage3) == w(s3)
  assert w(pipeline.get_config("tiny,replay=0").stages.stage2) == {"self_critic": 1.0}
