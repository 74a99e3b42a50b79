"""SA-CPO and the baseline losses: pure, keyword-only functions over the [B, K, T] batch contract.

The model runs once over the flattened `[B*K, T]` batch; `model.logprobs.sequence_logprobs` turns
its hidden states into per-response summed log-probs and token counts `[B, K]`; each loss maps
those (with the ratings and the response mask) to `(scalar loss, metrics)`. Nothing here knows
about models or configs.

SA-CPO (DESIGN.md): with l_k the token-mean NLL of response k and b the best-rated valid response
  L = l_b + ratio * A_{k != b valid}[ max(0, l_b - l_k + margin * (r_b - r_k) / rating_scale) ]
A = mean or max. `hinge="after_aggregate"` reproduces the authors' release, which aggregates the
differences first and applies one hinge: max(0, A[l_b - l_k + margin * (r_b - r_k) / S]).

The baselines: SFT, RRHF, and the pairwise losses peers offer (DPO with conservative label
smoothing, IPO, SimPO, ORPO), each on the best vs the worst-rated response of a prompt, checked
against TRL's own code in tests/test_losses_peers.py.
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Every loss reports these. nll_best, nll_gap and accuracy mean the same for all losses (the
# token-mean NLL of the best-rated response; mean NLL gap of the others to it; share of prompts
# whose best response has the lowest NLL); hinge_mean / hinge_active are each loss's pairwise
# term, documented in its registry entry (`Loss.hinge_metrics`).
METRIC_KEYS = ("nll_best", "hinge_mean", "hinge_active", "nll_gap", "accuracy")


def _token_mean_nll(logp, n_tokens):
  return -logp / jnp.maximum(n_tokens, 1.0)


def _clean(values, valid):
  """Zero the entries of padded slots: DESIGN.md lets their rating be anything (NaN included),
  and a NaN times a zero weight would still poison every sum it enters."""
  return jnp.where(valid, values, 0.0)


def _best_index(ratings, valid):
  """Index of the highest rating among valid responses; ties go to the first."""
  return jnp.argmax(jnp.where(valid, ratings, -jnp.inf), axis=-1)


def _take(x, idx):
  return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _safe_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _ranking_metrics(nll, valid, ratings, best, hinge=None, others=None):
  """The metrics DESIGN.md lists, shared by every loss so logs compare across methods."""
  k = nll.shape[-1]
  others = valid & (jnp.arange(k)[None] != best[:, None]) if others is None else others
  nll_best = _take(nll, best)
  has_valid = jnp.any(valid, axis=-1).astype(jnp.float32)
  has_pair = jnp.any(others, axis=-1).astype(jnp.float32)
  gap = nll - nll_best[:, None]
  min_other = jnp.min(jnp.where(others, nll, jnp.inf), axis=-1)
  metrics = {
      "nll_best": _safe_mean(nll_best, has_valid),
      "nll_gap": _safe_mean(gap, others.astype(jnp.float32)),
      "accuracy": _safe_mean((nll_best < min_other).astype(jnp.float32), has_pair),
      "hinge_mean": jnp.float32(0.0),
      "hinge_active": jnp.float32(0.0),
  }
  if hinge is not None:
    w = others.astype(jnp.float32)
    metrics["hinge_mean"] = _safe_mean(hinge, w)
    metrics["hinge_active"] = _safe_mean((hinge > 0).astype(jnp.float32), w)
  return metrics


def sa_cpo(*, logp, n_tokens, response_mask, ratings, ratio=0.2, margin=10.0, rating_scale=7.0,
           aggregate="mean", hinge="per_pair"):
  """Stable Alignment's contrastive preference loss. All array args are [B, K]."""
  if aggregate not in ("mean", "max") or hinge not in ("per_pair", "after_aggregate"):
    raise ValueError(f"aggregate={aggregate!r} (mean|max), hinge={hinge!r} (per_pair|after_aggregate)")
  valid = response_mask > 0
  nll = _clean(_token_mean_nll(logp, n_tokens), valid)
  ratings = _clean(ratings, valid)
  best = _best_index(ratings, valid)
  k = nll.shape[-1]
  others = valid & (jnp.arange(k)[None] != best[:, None])
  nll_best, r_best = _take(nll, best), _take(ratings, best)
  diff = nll_best[:, None] - nll + margin * (r_best[:, None] - ratings) / rating_scale  # [B,K]
  w = others.astype(jnp.float32)
  n_others = jnp.maximum(jnp.sum(w, axis=-1), 1.0)

  def agg(x):
    if aggregate == "mean":
      return jnp.sum(x * w, axis=-1) / n_others
    return jnp.max(jnp.where(others, x, -jnp.inf), axis=-1)

  pair_hinge = jnp.maximum(diff, 0.0)
  if hinge == "per_pair":
    penalty = agg(pair_hinge)
  else:
    penalty = jnp.maximum(agg(diff), 0.0)
  penalty = jnp.where(jnp.any(others, axis=-1), penalty, 0.0)  # one valid response: plain SFT
  has_valid = jnp.any(valid, axis=-1).astype(jnp.float32)
  loss = _safe_mean(nll_best + ratio * penalty, has_valid)
  return loss, _ranking_metrics(nll, valid, ratings, best, pair_hinge, others)


def sft(*, logp, n_tokens, response_mask, ratings, responses="best"):
  """Token-mean NLL of the best response (`responses="best"`) or of every valid one (`"all"`)."""
  valid = response_mask > 0
  nll = _clean(_token_mean_nll(logp, n_tokens), valid)
  best = _best_index(ratings, valid)
  if responses == "best":
    loss = _safe_mean(_take(nll, best), jnp.any(valid, axis=-1).astype(jnp.float32))
  elif responses == "all":
    loss = _safe_mean(nll, valid.astype(jnp.float32))
  else:
    raise ValueError(f"sft responses={responses!r}; expected best|all")
  return loss, _ranking_metrics(nll, valid, ratings, best)


def rrhf(*, logp, n_tokens, response_mask, ratings, rank_weight=1.0):
  """RRHF (Yuan et al. 2023): sum over pairs r_i < r_j of max(0, p_i - p_j), p = length-normalised
  log-prob, plus the NLL of the best response; averaged over prompts."""
  valid = response_mask > 0
  p = _clean(logp / jnp.maximum(n_tokens, 1.0), valid)
  ratings = _clean(ratings, valid)
  nll = -p
  best = _best_index(ratings, valid)
  worse = (ratings[:, :, None] < ratings[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  pair = jnp.maximum(p[:, :, None] - p[:, None, :], 0.0) * worse  # [B, i, j]
  has_valid = jnp.any(valid, axis=-1).astype(jnp.float32)
  rank = jnp.sum(pair, axis=(1, 2))
  loss = _safe_mean(rank_weight * rank + _take(nll, best), has_valid)
  metrics = _ranking_metrics(nll, valid, ratings, best)
  metrics["hinge_mean"] = _safe_mean(jnp.sum(pair, axis=(1, 2)), has_valid)
  metrics["hinge_active"] = _safe_mean((pair > 0).astype(jnp.float32), worse.astype(jnp.float32))
  return loss, metrics


def _pair(ratings, valid):
  """(best, worst, has_pair): the best- and the worst-rated valid response of each prompt (first
  on ties) and 1.0 where their ratings differ. The pairwise losses below contrast these two, so
  a K = 2 file of chosen/rejected rows is exactly TRL's pair, and K > 2 keeps the widest gap."""
  best = _best_index(ratings, valid)
  worst = jnp.argmin(jnp.where(valid, ratings, jnp.inf), axis=-1)
  has_pair = (_take(ratings, best) > _take(ratings, worst)).astype(jnp.float32)
  return best, worst, has_pair


def _pair_metrics(logp, n_tokens, valid, ratings, best, has_pair, margin):
  """The shared metrics, with hinge_mean / hinge_active the mean of a loss's pairwise margin
  and the share of pairs where it is above 0."""
  metrics = _ranking_metrics(_clean(_token_mean_nll(logp, n_tokens), valid), valid, ratings, best)
  metrics["hinge_mean"] = _safe_mean(margin, has_pair)
  metrics["hinge_active"] = _safe_mean((margin > 0).astype(jnp.float32), has_pair)
  return metrics


def _smoothed_logistic(z, label_smoothing):
  """-(1 - e) log sigmoid(z) - e log sigmoid(-z): the logistic loss when the preference label is
  flipped with probability e (conservative DPO; e = 0 is DPO)."""
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def dpo(*, logp, n_tokens, response_mask, ratings, ref_logp, beta=0.1, label_smoothing=0.0):
  """DPO (Rafailov et al. 2023) on the best vs the worst-rated valid response of each prompt.

  logp / ref_logp are summed response log-probs [B, K] under the policy and the frozen reference.
  Prompts without two differently rated valid responses carry no pair and are left out.
  label_smoothing e > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy
  preferences"): the label is taken as flipped with probability e. Older TRL DPOTrainers smoothed
  their sigmoid loss so; TRL 1.16's CPO trainer's sigmoid loss still does.
  """
  valid = response_mask > 0
  logp, ref_logp = _clean(logp, valid), _clean(ref_logp, valid)
  best, worst, has_pair = _pair(ratings, valid)
  chosen = _take(logp, best) - _take(ref_logp, best)
  rejected = _take(logp, worst) - _take(ref_logp, worst)
  margin = beta * (chosen - rejected)
  loss = _safe_mean(_smoothed_logistic(margin, label_smoothing), has_pair)
  return loss, _pair_metrics(logp, n_tokens, valid, ratings, best, has_pair, margin)


def ipo(*, logp, n_tokens, response_mask, ratings, ref_logp, beta=0.1):
  """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2 with h the chosen minus the rejected
  log-ratio to the reference, each divided by its response's token count as TRL does (its
  authors' normalisation: the squared loss would otherwise grow with length); beta is the tau
  of the paper. Best vs worst-rated response, as `dpo`."""
  valid = response_mask > 0
  logp, ref_logp = _clean(logp, valid), _clean(ref_logp, valid)
  best, worst, has_pair = _pair(ratings, valid)
  per_token = (logp - ref_logp) / jnp.maximum(n_tokens, 1.0)
  h = _take(per_token, best) - _take(per_token, worst)
  loss = _safe_mean((h - 1.0 / (2.0 * beta)) ** 2, has_pair)
  return loss, _pair_metrics(logp, n_tokens, valid, ratings, best, has_pair, h)


def simpo(*, logp, n_tokens, response_mask, ratings, beta=0.1, gamma=0.5, label_smoothing=0.0):
  """SimPO (Meng et al. 2024): -log sigmoid(beta * (p_w - p_l) - gamma), p the token-mean
  log-prob of a response; no reference model. Best vs worst-rated response, as `dpo`;
  label_smoothing as in `dpo` (TRL's CPO trainer offers it for SimPO too). The defaults are
  TRL's (CPOConfig); configs/simpo.py sets the paper's larger beta and gamma."""
  valid = response_mask > 0
  logp = _clean(logp, valid)
  best, worst, has_pair = _pair(ratings, valid)
  p = logp / jnp.maximum(n_tokens, 1.0)
  margin = beta * (_take(p, best) - _take(p, worst)) - gamma
  loss = _safe_mean(_smoothed_logistic(margin, label_smoothing), has_pair)
  return loss, _pair_metrics(logp, n_tokens, valid, ratings, best, has_pair, margin)


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012). The inputs of
  the branch not taken are moved to a safe point, so its gradient is not NaN either."""
  small = x < -0.6931471805599453
  a = jnp.where(small, x, -1.0)
  b = jnp.where(small, -1.0, jnp.minimum(x, -1e-30))
  return jnp.where(small, jnp.log1p(-jnp.exp(a)), jnp.log(-jnp.expm1(b)))


def orpo(*, logp, n_tokens, response_mask, ratings, beta=0.1):
  """ORPO (Hong et al. 2024): the SFT loss of the best response plus beta (the paper's lambda)
  times -log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with p the
  token-mean probability exp(logp / n). No reference model.

  The SFT term is the token-mean NLL of the best response averaged over prompts, as in `sft`
  and `sa_cpo`, so the methods' NLLs compare; TRL's ORPO trainer instead pools the NLL over all
  chosen tokens of the batch, prompt tokens included. The odds-ratio term is TRL's. Prompts
  without a rated pair take the SFT term alone."""
  valid = response_mask > 0
  logp = _clean(logp, valid)
  best, worst, has_pair = _pair(ratings, valid)
  p = logp / jnp.maximum(n_tokens, 1.0)  # 0 for an empty slot, which no pair reads
  p_c, p_r = _take(p, best), _take(p, worst)
  p_safe = lambda x: jnp.where(has_pair > 0, x, -1.0)  # keeps log1mexp(0) out of unpaired rows
  log_odds = (p_c - p_r) - (_log1mexp(p_safe(p_c)) - _log1mexp(p_safe(p_r)))
  log_odds = jnp.where(has_pair > 0, log_odds, 0.0)
  has_valid = jnp.any(valid, axis=-1).astype(jnp.float32)
  loss = (_safe_mean(-p_c, has_valid)
          + beta * _safe_mean(-jax.nn.log_sigmoid(log_odds), has_pair))
  return loss, _pair_metrics(logp, n_tokens, valid, ratings, best, has_pair, log_odds)


@dataclasses.dataclass(frozen=True)
class Loss:
  """One registry entry: the function; the `config.loss` key each of its hyper-parameters is
  read from; the values a key may take (checked before anything heavy starts); whether it
  needs `ref_logp` from a frozen reference model; what its hinge metrics mean."""
  fn: Callable
  config_keys: Mapping[str, str]  # function keyword -> config.loss key
  choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # config key -> values
  needs_reference: bool = False
  hinge_metrics: str = ""


LOSSES: dict[str, Loss] = {
    "sa_cpo": Loss(
        sa_cpo, {"ratio": "ratio", "margin": "margin", "rating_scale": "rating_scale",
                 "aggregate": "aggregate", "hinge": "hinge"},
        choices={"aggregate": ("mean", "max"), "hinge": ("per_pair", "after_aggregate")},
        hinge_metrics="hinge_mean: mean per-pair hinge max(0, l_b - l_k + margin * dr / S) over "
                      "the valid non-best responses; hinge_active: the share of them above 0"),
    "sft": Loss(sft, {"responses": "sft_responses"}, choices={"sft_responses": ("best", "all")},
                hinge_metrics="both 0: SFT has no pairwise term"),
    "rrhf": Loss(rrhf, {"rank_weight": "rank_weight"},
                 hinge_metrics="hinge_mean: the summed ranking hinge per prompt; hinge_active: "
                               "the share of worse/better pairs whose hinge is above 0"),
    "dpo": Loss(dpo, {"beta": "beta", "label_smoothing": "label_smoothing"},
                needs_reference=True,
                hinge_metrics="hinge_mean: the DPO reward margin beta * (chosen - rejected "
                              "log-ratio); hinge_active: the share of pairs with margin > 0"),
    "ipo": Loss(ipo, {"beta": "beta"}, needs_reference=True,
                hinge_metrics="hinge_mean: the per-token log-ratio margin h (chosen - rejected); "
                              "hinge_active: the share of pairs with h > 0"),
    "simpo": Loss(simpo, {"beta": "beta", "gamma": "simpo_gamma",
                          "label_smoothing": "label_smoothing"},
                  hinge_metrics="hinge_mean: beta * (p_chosen - p_rejected) - gamma, p the "
                                "token-mean log-prob; hinge_active: the share of pairs above 0"),
    "orpo": Loss(orpo, {"beta": "beta"},
                 hinge_metrics="hinge_mean: the log odds ratio of chosen to rejected; "
                               "hinge_active: the share of pairs where it is above 0"),
}


def spec(name: str) -> Loss:
  if name not in LOSSES:
    raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
  return LOSSES[name]


def get_loss(name: str) -> Callable:
  return spec(name).fn


def needs_reference(name: str) -> bool:
  return spec(name).needs_reference


def loss_kwargs(lc: Mapping[str, Any]) -> dict:
  """The keyword arguments of `lc["name"]`'s function, read from a config.loss mapping; a key
  that is missing or holds a value outside its choices raises naming `config.loss.<key>`."""
  entry = spec(lc["name"])
  out = {}
  for kw, key in entry.config_keys.items():
    if key not in lc:
      raise KeyError(f"config.loss.{key} is missing (loss {lc['name']!r} reads it)")
    value = lc[key]
    if key in entry.choices and value not in entry.choices[key]:
      raise ValueError(f"config.loss.{key}={value!r}: expected one of {entry.choices[key]} "
                       f"(loss {lc['name']!r})")
    out[kw] = value
  return out


def validate_batch(batch: dict, where: str = "batch") -> None:
  """Host-side check before any compute: every prompt has a valid response, no NaN rating,
  every valid response has at least one loss token."""
  rm = np.asarray(batch["response_mask"]) > 0
  ratings = np.asarray(batch["ratings"])
  n_tok = np.asarray(batch["loss_mask"]).sum(-1)
  empty = np.flatnonzero(~rm.any(-1))
  if empty.size:
    raise ValueError(f"{where}: prompts {empty.tolist()} have no valid response (response_mask all 0)")
  bad = np.argwhere(rm & ~np.isfinite(ratings))
  if bad.size:
    raise ValueError(f"{where}: non-finite ratings at [prompt, response] {bad.tolist()[:8]}")
  no_tok = np.argwhere(rm & (n_tok == 0))
  if no_tok.size:
    raise ValueError(f"{where}: valid responses with no loss tokens at {no_tok.tolist()[:8]}")
