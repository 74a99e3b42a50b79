"""The optimizer every trainer (stages, reward model, PPO) and the planner build from
`config.optim`."""

import jax
import ml_collections
import optax


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on norm scales.
  `warmup_ratio = 0` means no warmup: the first update runs at the peak lr (a warmup of even
  one step would make it an update at lr 0)."""
  warmup = int(oc.warmup_ratio * total_steps)
  end = oc.lr * oc.min_lr_ratio
  if warmup == 0:
    schedule = optax.cosine_decay_schedule(oc.lr, decay_steps=max(total_steps, 1),
                                           alpha=oc.min_lr_ratio)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=oc.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  return tx, schedule
