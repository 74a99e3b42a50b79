"""Losses against an independent float64 numpy reference written from DESIGN.md's formulas.

Every case goes end to end: random logits -> `model.logprobs.sequence_logprobs` -> loss, compared with numpy
that does its own log-softmax, its own token means and explicit per-prompt loops. Hand-worked
examples pin the two hinge forms (paper: per pair; authors' release: after aggregating).
"""

import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stable_alignment_jax.training import losses
from stable_alignment_jax.model import logprobs
from stable_alignment_jax.data.hindsight import BAD, GOOD, chain_of_hindsight

_logits_head = lambda x: x  # the cases are logits already: the LM head is the identity
V, T, PROMPT = 11, 9, 3  # vocab, length, prompt tokens (positions 0..2 never count)
METRICS = ("nll_best", "hinge_mean", "hinge_active", "nll_gap", "accuracy")


# --- random batches ---------------------------------------------------------------------------

def make_case(seed, b, k, kind):
  """A [B, K, T] batch plus logits [B*K, T, V].

  kind (per prompt; "mixed" gives prompt i the kind KINDS[i % 5]): random | ties (ratings 1..2)
  | all_equal | one_valid | padded (a random subset valid, holes anywhere, not only on the right).
  Every response has 1..T-PROMPT counted tokens (right padding inside a row). Padded slots get
  garbage ratings (NaN, 99): DESIGN.md says their rating is ignored.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, size=(b, k, T)).astype(np.int32)
  loss_mask = np.zeros((b, k, T), np.float32)
  ratings = np.zeros((b, k), np.float32)
  valid = np.ones((b, k), bool)
  for i in range(b):
    this = KINDS[i % len(KINDS)] if kind == "mixed" else kind
    for j in range(k):
      loss_mask[i, j, PROMPT:rng.integers(PROMPT + 1, T + 1)] = 1.0
    if this == "ties":
      ratings[i] = rng.integers(1, 3, size=k)
    elif this == "all_equal":
      ratings[i] = 4.0
    else:
      ratings[i] = rng.integers(1, 8, size=k)
    if this == "one_valid":
      valid[i] = np.arange(k) == rng.integers(0, k)
    elif this == "padded":
      valid[i] = False
      valid[i, rng.permutation(k)[:rng.integers(1, k + 1)]] = True
  ratings = np.where(valid, ratings, np.float32(np.nan))
  ratings[~valid & (np.arange(k)[None] % 2 == 1)] = 99.0
  loss_mask[~valid] = 0.0
  logits = (2.0 * rng.standard_normal((b * k, T, V))).astype(np.float32)
  batch = {"tokens": tokens, "loss_mask": loss_mask, "ratings": ratings,
           "response_mask": valid.astype(np.float32)}
  return logits, batch


KINDS = ("random", "ties", "all_equal", "one_valid", "padded")
# For K = 1..4, B=5 with one prompt of each kind side by side; B=1 per kind at K=3 (and K=1).
CASES = ([(k, 5, "mixed") for k in (1, 2, 3, 4)] + [(3, 1, kind) for kind in KINDS]
         + [(1, 1, "random")])


def _seed(k, b, kind):
  return 100 * k + 10 * b + (KINDS + ("mixed",)).index(kind)


# --- numpy reference (DESIGN.md) --------------------------------------------------------------

def np_logprobs(logits, tokens, loss_mask):
  """Summed log p of each response's counted tokens; token t is predicted at position t-1."""
  x = logits.astype(np.float64)
  n, t, _ = x.shape
  logp = np.zeros(n)
  count = np.zeros(n)
  for r in range(n):
    for pos in range(1, t):
      if loss_mask[r, pos]:
        row = x[r, pos - 1]
        lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
        logp[r] += row[tokens[r, pos]] - lse
        count[r] += 1
  return logp, count


def np_prompt_view(logits, batch):
  """Per prompt: list of (index, token-mean NLL, summed logp, rating) of its valid responses."""
  b, k, t = batch["tokens"].shape
  logp, count = np_logprobs(logits, batch["tokens"].reshape(b * k, t),
                            batch["loss_mask"].reshape(b * k, t))
  logp, count = logp.reshape(b, k), count.reshape(b, k)
  out = []
  for i in range(b):
    rows = [(j, -logp[i, j] / count[i, j], logp[i, j], float(batch["ratings"][i, j]))
            for j in range(k) if batch["response_mask"][i, j] > 0]
    out.append(rows)
  return out


def np_best(rows):
  best = rows[0]
  for row in rows[1:]:
    if row[3] > best[3]:  # strict: ties keep the first
      best = row
  return best


def np_metrics(prompts, hinge_of=None):
  """DESIGN.md's metrics; pairs = (prompt, valid k != best)."""
  nll_best, gaps, hinges, correct = [], [], [], []
  for rows in prompts:
    b = np_best(rows)
    others = [r for r in rows if r[0] != b[0]]
    nll_best.append(b[1])
    gaps += [r[1] - b[1] for r in others]
    if hinge_of is not None:
      hinges += [hinge_of(b, r) for r in others]
    if others:
      correct.append(float(b[1] < min(r[1] for r in others)))
  mean = lambda x: float(np.mean(x)) if x else 0.0
  return {"nll_best": mean(nll_best), "nll_gap": mean(gaps), "accuracy": mean(correct),
          "hinge_mean": mean(hinges), "hinge_active": mean([float(h > 0) for h in hinges])}


def np_sa_cpo(prompts, ratio, margin, scale, aggregate, hinge):
  def diff(b, r):
    return b[1] - r[1] + margin * (b[3] - r[3]) / scale

  agg = {"mean": np.mean, "max": np.max}[aggregate]
  total = []
  for rows in prompts:
    b = np_best(rows)
    diffs = [diff(b, r) for r in rows if r[0] != b[0]]
    if not diffs:
      penalty = 0.0  # one valid response: SFT on it
    elif hinge == "per_pair":
      penalty = agg([max(0.0, d) for d in diffs])
    else:
      penalty = max(0.0, agg(diffs))
    total.append(b[1] + ratio * penalty)
  return float(np.mean(total)), np_metrics(prompts, lambda b, r: max(0.0, diff(b, r)))


def np_sft(prompts, responses):
  if responses == "best":
    loss = np.mean([np_best(rows)[1] for rows in prompts])
  else:
    loss = np.mean([r[1] for rows in prompts for r in rows])
  return float(loss), np_metrics(prompts)


def np_rrhf(prompts, rank_weight):
  """Sum over pairs r_i < r_j of max(0, p_i - p_j), p = -token-mean NLL, + NLL of best."""
  per_prompt, sums, active = [], [], []
  for rows in prompts:
    s = 0.0
    for lo, hi in itertools.product(rows, rows):
      if lo[3] < hi[3]:
        h = max(0.0, -lo[1] + hi[1])
        s += h
        active.append(float(h > 0))
    sums.append(s)
    per_prompt.append(rank_weight * s + np_best(rows)[1])
  m = np_metrics(prompts)
  m["hinge_mean"] = float(np.mean(sums))
  m["hinge_active"] = float(np.mean(active)) if active else 0.0
  return float(np.mean(per_prompt)), m


def np_dpo(prompts, ref_logp, beta):
  """Best vs worst-rated valid response (first on ties) against the reference, per prompt that
  has two different ratings; -log sigmoid(beta * (chosen - rejected) log-ratio)."""
  terms, margins = [], []
  for i, rows in enumerate(prompts):
    best = np_best(rows)
    worst = rows[0]
    for r in rows[1:]:
      if r[3] < worst[3]:
        worst = r
    if best[3] <= worst[3]:
      continue
    z = beta * ((best[2] - ref_logp[i, best[0]]) - (worst[2] - ref_logp[i, worst[0]]))
    terms.append(np.log1p(np.exp(-z)))
    margins.append(z)
  m = np_metrics(prompts)
  m["hinge_mean"] = float(np.mean(margins)) if margins else 0.0
  m["hinge_active"] = float(np.mean([z > 0 for z in margins])) if margins else 0.0
  return (float(np.mean(terms)) if terms else 0.0), m


# --- the losses through sequence_logprobs -----------------------------------------------------

# Every loss configuration under test: (label, loss name, keyword args).
VARIANTS = [(f"sa_cpo/{agg}/{hinge}/{ratio}", "sa_cpo",
             dict(aggregate=agg, hinge=hinge, ratio=ratio, margin=margin, rating_scale=scale))
            for agg in ("mean", "max") for hinge in ("per_pair", "after_aggregate")
            for ratio, margin, scale in ((0.2, 10.0, 7.0), (1.5, 0.5, 3.0))]
VARIANTS += [("sft/best", "sft", dict(responses="best")), ("sft/all", "sft", dict(responses="all")),
             ("rrhf", "rrhf", dict(rank_weight=0.7)), ("dpo", "dpo", dict(beta=0.3))]


@jax.jit
def all_losses(logits, batch, ref_logp):
  """label -> ((loss, metrics), d loss / d logits) for every variant; one compile per shape."""
  b, k, t = batch["tokens"].shape
  out = {}
  for label, name, kw in VARIANTS:
    extra = {"ref_logp": ref_logp} if name == "dpo" else {}

    def f(lg, name=name, kw=kw, extra=extra):
      logp, n = logprobs.sequence_logprobs(lg, _logits_head, batch["tokens"].reshape(b * k, t),
                                           batch["loss_mask"].reshape(b * k, t))
      return losses.get_loss(name)(
          logp=logp.reshape(b, k), n_tokens=n.reshape(b, k), response_mask=batch["response_mask"],
          ratings=batch["ratings"], **kw, **extra)

    out[label] = jax.value_and_grad(f, has_aux=True)(logits)
  return out


def run_all(logits, batch, ref_logp):
  got = jax.device_get(all_losses(jnp.asarray(logits), jax.tree.map(jnp.asarray, batch),
                                  jnp.asarray(ref_logp)))
  return {label: (float(l), {key: float(v) for key, v in m.items()}, np.asarray(g))
          for label, ((l, m), g) in got.items()}


def reference(label, prompts, ref_logp):
  name, kw = {v[0]: v[1:] for v in VARIANTS}[label]
  if name == "sa_cpo":
    return np_sa_cpo(prompts, kw["ratio"], kw["margin"], kw["rating_scale"], kw["aggregate"],
                     kw["hinge"])
  if name == "sft":
    return np_sft(prompts, kw["responses"])
  if name == "rrhf":
    return np_rrhf(prompts, kw["rank_weight"])
  return np_dpo(prompts, ref_logp, kw["beta"])


def random_ref_logp(seed, b, k):
  return np.random.default_rng(seed).normal(-20.0, 3.0, size=(b, k)).astype(np.float32)


@pytest.mark.parametrize("k,b,kind", CASES)
def test_losses_match_numpy(k, b, kind):
  seed = _seed(k, b, kind)
  logits, batch = make_case(seed, b, k, kind)
  ref_logp = random_ref_logp(seed, b, k)
  prompts = np_prompt_view(logits, batch)
  pad = (batch["response_mask"] == 0).reshape(b * k)
  for label, (loss, metrics, grad) in run_all(logits, batch, ref_logp).items():
    ref_loss, ref_metrics = reference(label, prompts, ref_logp)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6, err_msg=label)
    assert set(metrics) == set(METRICS), label
    for key in METRICS:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, atol=2e-6,
                                 err_msg=f"{label} {key}")
    assert np.isfinite(grad).all(), label
    # Padded responses take no part: not a single gradient entry on their logits.
    assert not grad[pad].any(), label
    if label != "dpo" or any(len({r[3] for r in rows}) > 1 for rows in prompts):
      assert np.abs(grad).sum() > 0, label


def test_one_valid_response_is_sft():
  """Prompts with one valid response: every SA-CPO form == SFT on it, in value and gradient."""
  logits, batch = make_case(7, 5, 3, "one_valid")
  got = run_all(logits, batch, random_ref_logp(7, 5, 3))
  sft_loss, _, sft_grad = got["sft/best"]
  assert np.abs(sft_grad).sum() > 0
  for label, (loss, _, grad) in got.items():
    if label.startswith("sa_cpo"):
      np.testing.assert_allclose(loss, sft_loss, rtol=1e-6, err_msg=label)
      np.testing.assert_allclose(grad, sft_grad, rtol=1e-5, atol=1e-9, err_msg=label)


# --- hand-worked: paper form vs authors' release ----------------------------------------------

def _direct(nll, ratings, valid=None, n=4.0, **kw):
  """sa_cpo fed token-mean NLLs directly (logp = -nll * n with n tokens each)."""
  nll = jnp.asarray(nll, jnp.float32)
  valid = jnp.ones_like(nll) if valid is None else jnp.asarray(valid, jnp.float32)
  return losses.sa_cpo(logp=-nll * n, n_tokens=jnp.full_like(nll, n), response_mask=valid,
                       ratings=jnp.asarray(ratings, jnp.float32), **kw)


def test_hinge_forms_hand_worked():
  """ratio 0.5, margin 7, scale 7 -> the margin term is r_b - r_k.

  Prompt A: nll (2, 1, 9), ratings (6, 4, 1) -> best 0 (nll 2).
    diffs: 2-1+(6-4) = 3;  2-9+(6-1) = -2.
    per_pair mean:        (max(0,3) + max(0,-2)) / 2 = 1.5 -> 2 + 0.5*1.5 = 2.75
    after_aggregate mean: max(0, (3 + -2) / 2) = 0.5       -> 2 + 0.5*0.5 = 2.25
    max (both forms):     max(3, 0) = 3                    -> 2 + 0.5*3   = 3.5
  Prompt B: nll (2, 1, 12), same ratings: diffs 3 and 2-12+5 = -5.
    per_pair mean 1.5 -> 2.75;  after_aggregate mean max(0, -1) = 0 -> 2.0 (hinge off).
  Batch [A, B]: per_pair (2.75 + 2.75)/2 = 2.75; after_aggregate (2.25 + 2.0)/2 = 2.125.
  Metrics of [A, B]: pairs' hinges 3, 0, 3, 0 -> hinge_mean 1.5, hinge_active 0.5;
    gaps (1-2, 9-2, 1-2, 12-2) = (-1, 7, -1, 10) -> nll_gap 3.75; nll_best 2; accuracy 0
    (response 1 has a lower nll than the best in both prompts).
  """
  kw = dict(ratio=0.5, margin=7.0, rating_scale=7.0)
  a, b, r = [2.0, 1.0, 9.0], [2.0, 1.0, 12.0], [6.0, 4.0, 1.0]
  expect = {("mean", "per_pair"): (2.75, 2.75, 2.75), ("mean", "after_aggregate"): (2.25, 2.0, 2.125),
            ("max", "per_pair"): (3.5, 3.5, 3.5), ("max", "after_aggregate"): (3.5, 3.5, 3.5)}
  for (agg, hinge), (la, lb, lab) in expect.items():
    got = [float(_direct([x], [r], aggregate=agg, hinge=hinge, **kw)[0]) for x in (a, b)]
    np.testing.assert_allclose(got, [la, lb], rtol=1e-6, err_msg=f"{agg} {hinge}")
    both, m = _direct([a, b], [r, r], aggregate=agg, hinge=hinge, **kw)
    np.testing.assert_allclose(float(both), lab, rtol=1e-6)
  m = {k: float(v) for k, v in m.items()}
  assert m == pytest.approx({"nll_best": 2.0, "hinge_mean": 1.5, "hinge_active": 0.5,
                             "nll_gap": 3.75, "accuracy": 0.0})


def test_authors_batch_size_one_behaviour():
  """The authors' release (agi-templar/Stable-Alignment, AlignmentTrainer.stable_alignment):
  one prompt per step, token-mean CE per response, min_loss = CE of the top-rated one, then
  diff = max(mean_k(min_loss - CE_k + (r_best - r_k) / rating_scale * margin), 0)
  (`max_flow`: the max over k instead of the mean), loss = min_loss + ratio * diff.
  (Their code reads r_k as sorted_ratings[k] with k an unsorted index, so it computes this
  formula only when the ratings arrive sorted high to low, as they do here.)
  Their defaults: ratio 0.5, margin 1.0, rating_scale 7. Hand-worked with those:
    nll (0.9, 1.3, 1.2, 1.5), ratings (7, 6, 5, 2): best = index 0, nll 0.9.
    terms: k=1: 0.9-1.3+1/7 = -0.4+0.142857 = -0.257143
           k=2: 0.9-1.2+2/7 = -0.3+0.285714 = -0.014286
           k=3: 0.9-1.5+5/7 = -0.6+0.714286 =  0.114286
    mean = -0.157143/3 = -0.052381 -> hinge 0: loss 0.9
    max_flow: 0.114286 = 0.8/7 -> 0.9 + 0.5*0.8/7 = 0.957143
    paper per_pair mean: (0 + 0 + 0.8/7)/3 = 0.8/21 -> 0.9 + 0.5*0.8/21 = 0.919048
  With nll_1 = 0.7 instead: k=1 term 0.9-0.7+1/7 = 0.342857;
    after_aggregate: mean (0.342857 - 0.014286 + 0.114286)/3 = 0.147619 -> 0.973810
    per_pair:        (0.342857 + 0 + 0.114286)/3 = 0.152381         -> 0.976190
  """
  r = [[7.0, 6.0, 5.0, 2.0]]
  kw = dict(ratio=0.5, margin=1.0, rating_scale=7.0)
  got = lambda nll, **o: float(_direct(nll, r, **kw, **o)[0])
  nll = [[0.9, 1.3, 1.2, 1.5]]
  assert got(nll, hinge="after_aggregate") == pytest.approx(0.9, abs=1e-6)
  assert got(nll, hinge="after_aggregate", aggregate="max") == pytest.approx(0.957143, abs=1e-6)
  assert got(nll, hinge="per_pair") == pytest.approx(0.919048, abs=1e-6)
  nll = [[0.9, 0.7, 1.2, 1.5]]
  assert got(nll, hinge="after_aggregate") == pytest.approx(0.973810, abs=1e-6)
  assert got(nll, hinge="per_pair") == pytest.approx(0.976190, abs=1e-6)


def test_padded_garbage_does_not_leak():
  """The same prompts with an extra padded slot holding a NaN / huge rating, other tokens,
  huge logits and a NaN reference log-prob: every loss, metric and gradient is unchanged."""
  logits, batch = make_case(3, 5, 3, "random")  # shapes shared with CASES: no extra compile
  b, k, t = batch["tokens"].shape
  ref_logp = random_ref_logp(3, b, k)
  pad = {key: np.concatenate([v, np.zeros_like(v[:, :1])], axis=1) for key, v in batch.items()}
  pad["ratings"][:, -1] = [np.nan, 1e9, -np.inf, np.nan, 0.0]
  pad["tokens"][:, -1] = 5
  lg = np.concatenate([logits.reshape(b, k, t, V), np.full((b, 1, t, V), 1e4, np.float32)], 1)
  ref_pad = np.concatenate([ref_logp, np.full((b, 1), np.nan, np.float32)], 1)
  before = run_all(logits, batch, ref_logp)
  after = run_all(lg.reshape(b * (k + 1), t, V), pad, ref_pad)
  for label, (loss, metrics, grad) in before.items():
    loss1, metrics1, grad1 = after[label]
    assert loss1 == pytest.approx(loss, rel=1e-6), label
    assert metrics1 == pytest.approx(metrics, rel=1e-6, abs=1e-7), label
    np.testing.assert_allclose(grad1.reshape(b, k + 1, t, V)[:, :k], grad.reshape(b, k, t, V),
                               rtol=1e-6, atol=1e-9, err_msg=label)
    assert not grad1.reshape(b, k + 1, t, V)[:, k].any(), label


# --- bad input ------------------------------------------------------------------------------

def test_validate_batch_rejects_bad_input():
  _, batch = make_case(0, 3, 3, "padded")
  losses.validate_batch(batch)  # NaN ratings on padded slots are fine
  empty = {k: v.copy() for k, v in batch.items()}
  empty["response_mask"][1] = 0.0
  with pytest.raises(ValueError, match=r"step 9 batch: prompts \[1\] have no valid response"):
    losses.validate_batch(empty, where="step 9 batch")
  nan = {k: v.copy() for k, v in batch.items()}
  i, j = np.argwhere(nan["response_mask"] > 0)[0]
  nan["ratings"][i, j] = np.nan
  with pytest.raises(ValueError, match=rf"non-finite ratings at \[prompt, response\] \[\[{i}, {j}\]\]"):
    losses.validate_batch(nan)
  no_tokens = {k: v.copy() for k, v in batch.items()}
  no_tokens["loss_mask"][i, j] = 0.0
  with pytest.raises(ValueError, match="no loss tokens"):
    losses.validate_batch(no_tokens)


def test_bad_options_raise():
  nll, r = [[1.0, 2.0]], [[1.0, 2.0]]
  with pytest.raises(ValueError, match="aggregate='median'"):
    _direct(nll, r, aggregate="median")
  with pytest.raises(ValueError, match="hinge='after'"):
    _direct(nll, r, hinge="after")
  with pytest.raises(KeyError, match="unknown loss 'ppo'"):
    losses.get_loss("ppo")


# --- Chain-of-Hindsight ---------------------------------------------------------------------

def test_chain_of_hindsight_hand_built():
  ex = {"prompt": "### Instruction:\nBe kind?\n\n### Response:\n", "stage": "imitation",
        "responses": [b"Maybe.", "Yes, always.", "No."], "ratings": [4.0, 7.0, 1.0]}
  seen = set()
  for seed in range(16):
    out = chain_of_hindsight(ex, np.random.default_rng(seed))
    assert out["prompt"] == ex["prompt"] and out["stage"] == "imitation"
    assert out["ratings"] == [7.0]
    seen.add(out["responses"][0])
  assert seen == {"A good answer: Yes, always.\nA worse answer: No.",
                  "A worse answer: No.\nA good answer: Yes, always."}
  assert ex["responses"][0] == b"Maybe."  # the input is not modified
  same = chain_of_hindsight({"prompt": "p", "responses": ["a", "b"], "ratings": [3, 3]},
                            np.random.default_rng(0))
  assert same["responses"] == [f"{GOOD} a"] and BAD not in same["responses"][0]
  with pytest.raises(ValueError, match="no responses"):
    chain_of_hindsight({"prompt": "p", "responses": [], "ratings": []}, np.random.default_rng(0))


def test_registry_entry_per_loss_reads_its_config_keys_and_checks_choices():
  from configs import base
  lc = base.get_config().loss
  for name, entry in losses.LOSSES.items():
    lc.name = name
    kwargs = losses.loss_kwargs(lc)
    assert set(kwargs) == set(entry.config_keys)  # and each is a keyword of the function
    assert set(kwargs) <= set(inspect.signature(entry.fn).parameters)
    assert entry.hinge_metrics
  assert [n for n in losses.LOSSES if losses.needs_reference(n)] == ["dpo", "ipo"]
  lc.name, lc.hinge = "sa_cpo", "per-pair"
  with pytest.raises(ValueError, match=r"config.loss.hinge='per-pair': expected one of "
                                       r"\('per_pair', 'after_aggregate'\)"):
    losses.loss_kwargs(lc)


def test_a_bad_loss_value_fails_before_tokenizer_data_or_params_load(tmp_path, monkeypatch):
  from configs import stage1
  from stable_alignment_jax.training import train
  c = stage1.get_config("tiny")
  c.checkpoint.dir, c.loss.hinge = str(tmp_path / "run"), "bogus"
  touched = []
  monkeypatch.setattr(train, "load_tokenizer", lambda *a, **k: touched.append("tokenizer"))
  monkeypatch.setattr(train.checkpoints, "resolve", lambda *a: touched.append("resolve"))
  c.checkpoint.init_from = "some-org/a-hub-model"  # would be downloaded first, were it checked
  with pytest.raises(ValueError, match="config.loss.hinge='bogus'"):
    train.run(c)
  assert touched == [] and not (tmp_path / "run").exists()


def test_function_defaults_agree_with_configs_base():
  """The keyword defaults (for direct callers) are the paper values configs/base.py sets."""
  from configs import base
  lc = base.get_config().loss
  for name, entry in losses.LOSSES.items():
    params = inspect.signature(entry.fn).parameters
    for kw, key in entry.config_keys.items():
      assert params[kw].default == lc[key], (name, kw)
