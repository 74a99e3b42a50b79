"""PPO's pure pieces: the KL penalty, GAE, whitening, the clipped losses (the per-token
log-probs they take come from `model.logprobs.target_logprobs`).

Everything works on per-token arrays [N, T] in the "action" frame: entry t is about token t of
the sequence (predicted from position t-1), and `mask[t] = 1` marks a token the policy sampled.
A row may hold several episodes: an episode ends where the mask drops to 0 (a done), and
nothing is bootstrapped across it. Formulas follow Schulman et al. 2017 (clipped surrogate),
Schulman et al. 2016 (GAE) and Ziegler et al. 2019 (KL-penalised reward, adaptive coefficient),
in the form TRLX uses for language models (clipped value loss, whitened advantages).
"""

import jax
import jax.numpy as jnp
import numpy as np


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / std over the masked entries; the mean is kept when `shift_mean` is False."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return (out if shift_mean else out + mean) * mask


def kl_penalty(*, logp, ref_logp, mask, coef) -> jax.Array:
  """The per-token reward term -coef * (log pi(a) - log pi_ref(a)) on sampled tokens: its sum
  over an episode is -coef times the sampled estimate of KL(pi || pi_ref)."""
  return -coef * (logp - ref_logp) * mask


def kl_estimate(*, logp, ref_logp, mask) -> jax.Array:
  """Per-row KL(pi || pi_ref) summed over the sampled tokens, with the non-negative, low-variance
  estimator r - 1 - log r, r = pi_ref(a) / pi(a) (Schulman's "k3"). [N]."""
  log_r = (ref_logp - logp) * mask
  return jnp.sum((jnp.exp(log_r) - 1.0 - log_r) * mask, axis=-1)


def gae(*, rewards, values, mask, gamma: float, lam: float):
  """Generalised advantage estimates and returns, [N, T] each (zero off the mask).

  delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
  so an episode's last token (m_{t+1} = 0) bootstraps from nothing. Returns R_t = A_t + V_t.
  """
  mask = mask.astype(jnp.float32)
  values, rewards = values * mask, rewards * mask
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values * next_mask - values

  def back(carry, x):
    delta, nm = x
    adv = delta + gamma * lam * nm * carry
    return adv, adv

  _, adv = jax.lax.scan(back, jnp.zeros(deltas.shape[:1], jnp.float32),
                        (deltas.T, next_mask.T), reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def policy_loss(*, logp, old_logp, advantages, mask, cliprange: float):
  """Clipped surrogate: mean over sampled tokens of max(-A r, -A clip(r, 1-eps, 1+eps)),
  r = pi(a) / pi_old(a). Returns (loss, metrics)."""
  log_ratio = (logp - old_logp) * mask
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  return loss, {"pg_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
                "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask)}


def value_loss(*, values, old_values, returns, mask, cliprange_value: float):
  """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clip - R)^2), with V_clip kept within
  cliprange_value of the rollout's value. Returns (loss, metrics)."""
  clipped = old_values + jnp.clip(values - old_values, -cliprange_value, cliprange_value)
  l1, l2 = jnp.square(values - returns), jnp.square(clipped - returns)
  loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
  return loss, {"vf_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask),
                "value_mean": masked_mean(values, mask)}


def adaptive_kl_coef(coef: float, kl: float, *, target: float, horizon: float,
                     n_steps: int) -> float:
  """Ziegler et al. 2019 §2.2: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon.
  A target of 0 keeps the coefficient fixed."""
  if not target:
    return coef
  error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
  return coef * (1.0 + error * n_steps / horizon)


def last_index(mask: jax.Array) -> jax.Array:
  """Index of the last 1 along the final axis (0 for an all-zero row)."""
  t = mask.shape[-1]
  has = jnp.any(mask > 0, axis=-1)
  return jnp.where(has, t - 1 - jnp.argmax(mask[..., ::-1] > 0, axis=-1), 0)
