"""The optimizer every trainer (stages, reward model, PPO) and the planner build from
`config.optim`."""

import jax
import ml_collections
import optax


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on norm scales."""
  warmup = max(1, int(oc.warmup_ratio * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=oc.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=oc.lr * oc.min_lr_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  return tx, schedule
