"""The preference losses peers offer (IPO, SimPO, ORPO, conservative DPO) against TRL's own code.

Each case starts from the same random logits and [B, 2, T] batch: ours goes through
`model.logprobs.sequence_logprobs` and the registry's loss; TRL's gets the same arrays as torch tensors, its
`get_batch_logps` (the length-averaged log-probs SimPO and ORPO use) and its loss code:
`DPOTrainer._compute_loss` (loss_type ipo / sigmoid) with the model replaced by a stub that
returns the per-token log-probs (TRL's fused LM head output), `CPOTrainer.cpo_loss` (simpo, and
sigmoid with label_smoothing for conservative DPO, fed the reference log-ratios as DPO would)
and `ORPOTrainer.odds_ratio_loss`. The chosen response sits in slot 0 or 1 at random, so our
best-vs-worst pick is exercised too.
"""

import collections
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its import warns that the API may move
# trl is a test dependency (setup.py's `test` extra): imported plainly, so a TRL that moved these
# modules fails here instead of skipping the parity checks.
from trl.experimental.cpo import cpo_trainer as trl_cpo
from trl.experimental.orpo import orpo_trainer as trl_orpo
from trl.trainer import dpo_trainer as trl_dpo

from stable_alignment_jax.training import losses
from stable_alignment_jax.model import logprobs

B, T, V, PROMPT = 6, 12, 13, 3


def make_pairs(seed):
  """logits [2B, T, V], tokens / loss_mask [B, 2, T], ratings [B, 2] (the chosen one higher),
  ref_logp [B, 2], and chosen [B] (its slot)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, size=(B, 2, T)).astype(np.int32)
  loss_mask = np.zeros((B, 2, T), np.float32)
  for i in range(B):
    for j in range(2):
      loss_mask[i, j, PROMPT:rng.integers(PROMPT + 1, T + 1)] = 1.0
  chosen = rng.integers(0, 2, size=B)
  ratings = np.where(np.arange(2)[None] == chosen[:, None], 5.0, 2.0).astype(np.float32)
  logits = (1.5 * rng.standard_normal((2 * B, T, V))).astype(np.float32)
  ref_logp = rng.normal(-12.0, 2.0, size=(B, 2)).astype(np.float32)
  return logits, tokens, loss_mask, ratings, ref_logp, chosen


def from_logits(logits, tokens, loss_mask):
  """Our summed response log-probs of logits that are given (the LM head is the identity)."""
  return logprobs.sequence_logprobs(logits, lambda x: x, tokens, loss_mask)


def ours(name, case, **kw):
  logits, tokens, loss_mask, ratings, ref_logp, _ = case
  logp, n = from_logits(jnp.asarray(logits), jnp.asarray(tokens.reshape(2 * B, T)),
                        jnp.asarray(loss_mask.reshape(2 * B, T)))
  extra = {"ref_logp": jnp.asarray(ref_logp)} if losses.needs_reference(name) else {}
  loss, metrics = losses.get_loss(name)(
      logp=logp.reshape(B, 2), n_tokens=n.reshape(B, 2), response_mask=jnp.ones((B, 2)),
      ratings=jnp.asarray(ratings), **kw, **extra)
  return float(loss), {k: float(v) for k, v in metrics.items()}


def trl_order(x, chosen):
  """[B, 2, ...] in our slots -> TRL's rows [chosen of every prompt; rejected of every prompt]."""
  rows = np.arange(B)
  return np.concatenate([x[rows, chosen], x[rows, 1 - chosen]])


def trl_view(case, grad=False):
  """TRL's layout (`trl_order`), labels -100 outside the completion; plus the references in
  that order. grad: the logits tensor requires grad."""
  logits, tokens, loss_mask, _, ref_logp, chosen = case
  order = lambda x: trl_order(x, chosen)
  logits_t = torch.from_numpy(order(logits.reshape(B, 2, T, V)).copy()).requires_grad_(grad)
  ids = torch.from_numpy(order(tokens).astype(np.int64))
  mask = torch.from_numpy(order(loss_mask).astype(np.int64))
  labels = ids.masked_fill(mask == 0, -100)
  ref = torch.from_numpy(order(ref_logp))
  return logits_t, ids, mask, labels, ref


def trl_avg_logps(case, view=None):
  logits_t, _, _, labels, _ = view or trl_view(case)
  avg = trl_cpo.CPOTrainer.get_batch_logps(logits_t, labels.clone(), average_log_prob=True)
  return avg[:B], avg[B:]


class _Accelerator:
  device = torch.device("cpu")
  gather = gather_for_metrics = staticmethod(lambda x: x)


def trl_dpo_loss(case, loss_type, beta, view=None):
  """DPOTrainer._compute_loss itself, on a stub trainer whose model returns the per-token
  log-probs of the labels (0 outside the completion), as TRL's fused LM head does."""
  logits_t, ids, mask, labels, ref = view or trl_view(case)
  shifted = labels[:, 1:]
  token_logp = torch.log_softmax(logits_t[:, :-1].double(), -1).gather(
      -1, shifted.clamp(min=0)[..., None])[..., 0]
  token_logp = torch.where(shifted == -100, 0.0, token_logp).float()
  n_rows, n_pos = token_logp.shape
  outputs = types.SimpleNamespace(
      log_probs=token_logp, entropy=torch.zeros(n_rows, n_pos),
      mean_logits=torch.zeros(n_rows, n_pos), is_top1=torch.zeros(n_rows, n_pos, dtype=bool))
  trainer = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
      aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
      label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
  inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
            "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
  loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  return (loss if view else float(loss)), metrics


def _cpo_stub(loss_type, beta, **kw):
  return types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta,
                               accelerator=_Accelerator(),
                               **{"label_smoothing": 0.0, "simpo_gamma": 0.0, **kw})


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_ipo_matches_trl_dpo_trainer(seed, beta):
  case = make_pairs(seed)
  loss, metrics = ours("ipo", case, beta=beta)
  want, _ = trl_dpo_loss(case, "ipo", beta)
  assert loss == pytest.approx(want, rel=2e-5)
  assert 0.0 < loss  # (h - 1/(2 beta))^2 is 0 only by accident


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_matches_trl_dpo_trainer(seed):
  """Plain DPO (label_smoothing 0) and TRL's reward margin / accuracy metrics."""
  case = make_pairs(seed)
  loss, metrics = ours("dpo", case, beta=0.3, label_smoothing=0.0)
  want, trl_metrics = trl_dpo_loss(case, "sigmoid", 0.3)
  assert loss == pytest.approx(want, rel=2e-5)
  assert metrics["hinge_mean"] == pytest.approx(trl_metrics["rewards/margins"], rel=2e-5)
  assert metrics["hinge_active"] == pytest.approx(trl_metrics["rewards/accuracies"])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_matches_trl(seed, eps):
  """TRL 1.16's DPOTrainer does not smooth its sigmoid loss; its CPO trainer keeps the very
  expression (-(1-e) log sig(b x) - e log sig(-b x)), which is conservative DPO when x is the
  chosen minus rejected log-ratio to the reference."""
  case = make_pairs(seed)
  loss, _ = ours("dpo", case, beta=0.2, label_smoothing=eps)
  logits_t, _, _, labels, ref = trl_view(case)
  summed = trl_cpo.CPOTrainer.get_batch_logps(logits_t, labels.clone(), average_log_prob=False)
  ratio = summed - ref
  got, _, _ = trl_cpo.CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.2, label_smoothing=eps),
                                          ratio[:B], ratio[B:])
  assert loss == pytest.approx(float(got.mean()), rel=2e-5)
  # log sig(z) - log sig(-z) = z, so the smoothing adds e * z to each pair's DPO loss.
  plain, metrics = ours("dpo", case, beta=0.2, label_smoothing=0.0)
  assert loss - plain == pytest.approx(eps * metrics["hinge_mean"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.0), (1.0, 0.3, 0.2)])
def test_simpo_matches_trl_cpo_trainer(seed, beta, gamma, eps):
  case = make_pairs(seed)
  loss, metrics = ours("simpo", case, beta=beta, gamma=gamma, label_smoothing=eps)
  c, r = trl_avg_logps(case)
  got, _, _ = trl_cpo.CPOTrainer.cpo_loss(
      _cpo_stub("simpo", beta, simpo_gamma=gamma, label_smoothing=eps), c, r)
  assert loss == pytest.approx(float(got.mean()), rel=2e-5)
  np.testing.assert_allclose(metrics["hinge_mean"], float((beta * (c - r) - gamma).mean()),
                             rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_odds_ratio(seed, beta):
  """Ours = token-mean NLL of the chosen + TRL's odds-ratio term (TRL's own NLL pools tokens
  over the batch, prompt included: the losses' docstring says why ours does not)."""
  case = make_pairs(seed)
  loss, metrics = ours("orpo", case, beta=beta)
  c, r = trl_avg_logps(case)
  stub = types.SimpleNamespace(beta=beta, accelerator=_Accelerator())
  term, _, _, _, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(stub, c, r)
  assert loss == pytest.approx(float(-c.mean() - term.mean()), rel=2e-5)
  assert metrics["hinge_mean"] == pytest.approx(float(log_odds), rel=2e-5, abs=1e-6)
  assert metrics["nll_best"] == pytest.approx(float(-c.mean()), rel=2e-5)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_gradients_wrt_logits_match_trl(name):
  """d loss / d logits through both whole paths (log-softmax, masks, averaging, the loss):
  TRL's by torch autograd, ours by jax.grad; the layouts differ only in row order."""
  case = make_pairs(5)
  logits, tokens, loss_mask, ratings, ref_logp, chosen = case
  kw = {"dpo": dict(beta=0.3, label_smoothing=0.0), "ipo": dict(beta=0.2),
        "simpo": dict(beta=2.0, gamma=1.0, label_smoothing=0.0), "orpo": dict(beta=0.5)}[name]

  def f(lg):
    logp, n = from_logits(lg, jnp.asarray(tokens.reshape(2 * B, T)),
                          jnp.asarray(loss_mask.reshape(2 * B, T)))
    extra = {"ref_logp": jnp.asarray(ref_logp)} if losses.needs_reference(name) else {}
    return losses.get_loss(name)(logp=logp.reshape(B, 2), n_tokens=n.reshape(B, 2),
                                 response_mask=jnp.ones((B, 2)), ratings=jnp.asarray(ratings),
                                 **kw, **extra)[0]

  ours_grad = trl_order(np.asarray(jax.grad(f)(jnp.asarray(logits))).reshape(B, 2, T, V), chosen)
  view = trl_view(case, grad=True)
  if name in ("dpo", "ipo"):
    loss, _ = trl_dpo_loss(case, "sigmoid" if name == "dpo" else "ipo", kw["beta"], view=view)
  else:
    c, r = trl_avg_logps(case, view)
    if name == "simpo":
      loss = trl_cpo.CPOTrainer.cpo_loss(_cpo_stub("simpo", 2.0, simpo_gamma=1.0), c, r)[0].mean()
    else:
      stub = types.SimpleNamespace(beta=0.5, accelerator=_Accelerator())
      loss = -c.mean() - trl_orpo.ORPOTrainer.odds_ratio_loss(stub, c, r)[0].mean()
  loss.backward()
  want = view[0].grad.numpy()
  assert np.abs(want).sum() > 0
  np.testing.assert_allclose(ours_grad, want, rtol=1e-4, atol=1e-7)


def test_reference_use_and_registry():
  """IPO and DPO read a reference, SimPO and ORPO do not; each name's config keys are read from
  configs/base.py's loss block without a missing key."""
  from configs import base
  lc = dict(base.get_config().loss)
  for name, needs in (("ipo", True), ("dpo", True), ("simpo", False), ("orpo", False)):
    assert losses.needs_reference(name) is needs
    kw = losses.loss_kwargs({**lc, "name": name})
    assert set(kw) <= set(losses.get_loss(name).__code__.co_varnames)
  case = make_pairs(0)
  moved = (case[0], case[1], case[2], case[3], case[4] + 5.0, case[5])
  assert ours("simpo", case) == ours("simpo", moved)  # the reference is not read
  assert ours("ipo", case, beta=0.1) != ours("ipo", moved, beta=0.1)


def test_pairless_and_padded_prompts():
  """A prompt whose responses are equally rated, or with one valid response, adds no pairwise
  term (ORPO keeps its SFT term on it) and no gradient through a padded slot; all finite."""
  logits, tokens, loss_mask, ratings, ref_logp, chosen = make_pairs(4)
  ratings = ratings.copy()
  ratings[0] = 3.0  # a tie: no pair
  valid = np.ones((B, 2), np.float32)
  valid[1, 1] = 0.0  # one valid response
  ratings[1, 1] = np.nan
  loss_mask = loss_mask.copy()
  loss_mask[1, 1] = 0.0
  t2 = jnp.asarray(tokens.reshape(2 * B, T))

  def f(lg, name, **kw):
    logp, n = from_logits(lg, t2, jnp.asarray(loss_mask.reshape(2 * B, T)))
    extra = {"ref_logp": jnp.asarray(ref_logp)} if losses.needs_reference(name) else {}
    return losses.get_loss(name)(logp=logp.reshape(B, 2), n_tokens=n.reshape(B, 2),
                                 response_mask=jnp.asarray(valid), ratings=jnp.asarray(ratings),
                                 **kw, **extra)[0]

  for name in ("ipo", "simpo", "orpo", "dpo"):
    kw = {"label_smoothing": 0.1} if name in ("dpo", "simpo") else {}
    g = np.asarray(jax.grad(f)(jnp.asarray(logits), name, **kw)).reshape(B, 2, T, V)
    assert np.isfinite(g).all(), name
    assert not g[1, 1].any(), name  # the padded slot
    if name == "orpo":  # SFT on the chosen of the tie and of the single response
      assert g[0, 0].any() and not g[0, 1].any() and g[1, 0].any(), name
    else:
      assert not g[0].any() and not g[1].any(), name
    assert g[2:].any(), name


def test_pipeline_peers_adds_their_baselines():
  """`configs/pipeline.py:peers` trains each new loss as a baseline row; without it the paper's
  baseline set is unchanged."""
  from configs import pipeline
  assert set(pipeline.get_config().baselines) == {"mixed", "sft", "dpo", "rrhf", "coh"}
  c = pipeline.get_config("peers")
  got = {name: (c.baselines[name].loss.name, c.baselines[name].loss.label_smoothing)
         for name in ("ipo", "simpo", "orpo", "cdpo")}
  assert got == {"ipo": ("ipo", 0.0), "simpo": ("simpo", 0.0), "orpo": ("orpo", 0.0),
                 "cdpo": ("dpo", 0.1)}
