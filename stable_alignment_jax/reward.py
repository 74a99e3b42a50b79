"""The reward model of the RLHF baseline: our LLaMA with a scalar head, Bradley–Terry trained.

r(prompt, response) = w . h_last + b, where h_last is the trunk's final hidden state at the
response's last token (its EOS when it has one): the one position that has read the whole
response. Training data is the [B, K, T] batch of DESIGN.md; every pair of valid responses of a
prompt with different ratings is one comparison (HH-RLHF: chosen vs rejected; SANDBOX imitation
groups: all pairs), and the loss is -log sigmoid(r_better - r_worse) averaged over comparisons
(Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022).

  python -m stable_alignment_jax.reward --config=configs/reward.py[:tiny]

The run directory is a training run like train.py's (Orbax items params, opt_state, data_iter,
config; run_config.json), with params = {"trunk": llama state, "head": {"w", "b"}}; `load`
reads it back for PPO.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stable_alignment_jax import checkpoints, data, data_lengths, losses, optim, sharding, train_log
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import ModelConfig
from stable_alignment_jax.ppo_losses import last_index, masked_mean
from stable_alignment_jax.tokenizer import load_tokenizer

# --- the scalar head ------------------------------------------------------------------------

def init_head(dim: int) -> dict:
  """A zero head: every response starts with reward 0, so the first gradients come from the
  comparisons alone (and a PPO value head starts by predicting 0)."""
  return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def apply_head(head: dict, h: jax.Array) -> jax.Array:
  """[..., D] hidden states -> [...] f32 scalars."""
  return jnp.einsum("...d,d->...", h.astype(jnp.float32), head["w"]) + head["b"]


def init_trunk(c: ml_collections.ConfigDict, mesh, spec: str | None = None):
  """(graphdef, params, origin) of the LLaMA a run starts from: `spec` (default
  checkpoint.init_from: a run directory, HF directory or hub id, or random:<preset>), or a random
  init of config.model when empty. A checkpoint brings its own architecture."""
  spec = c.checkpoint.init_from if spec is None else spec
  if not spec:
    cfg = ModelConfig.from_dict(c.model)
    graphdef, params = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(c.seed)), mesh)
    return graphdef, params, "random init"
  graphdef, params = checkpoints.load_model(spec, dtype=c.model.dtype, mesh=mesh)
  # The checkpoint's architecture with this run's compute settings (remat for training).
  cfg = dataclasses.replace(nnx.merge(graphdef, params).cfg, remat=c.model.remat)
  return abstract_trunk(cfg)[0], params, spec


def sequence_scores(graphdef, params, tokens, loss_mask):
  """Reward of each row of tokens [N, T] at its last loss-mask token. [N] f32."""
  h, _ = nnx.merge(graphdef, params["trunk"]).hidden(tokens)
  idx = last_index(loss_mask)
  h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
  return apply_head(params["head"], h_last)


# --- the loss ---------------------------------------------------------------------------------

def bradley_terry(*, scores, ratings, response_mask):
  """Mean over comparisons (i, j) of one prompt with r_i > r_j of -log sigmoid(s_i - s_j).

  scores, ratings, response_mask: [B, K]. Metrics: accuracy (s_i > s_j), mean margin
  s_i - s_j, and the number of comparisons.
  """
  valid = response_mask > 0
  ratings = jnp.where(valid, ratings, 0.0)  # padded slots may hold anything, NaN included
  scores = jnp.where(valid, scores, 0.0)
  pair = (ratings[:, :, None] > ratings[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  w = pair.astype(jnp.float32)
  margin = scores[:, :, None] - scores[:, None, :]
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(-jax.nn.log_sigmoid(margin) * w) / n
  return loss, {"accuracy": jnp.sum((margin > 0) * w) / n, "margin": jnp.sum(margin * w) / n,
                "pairs": jnp.sum(w)}


def batch_loss(params, batch, *, graphdef):
  b, k, t = batch["tokens"].shape
  s = sequence_scores(graphdef, params, batch["tokens"].reshape(b * k, t),
                      batch["loss_mask"].reshape(b * k, t)).reshape(b, k)
  loss, metrics = bradley_terry(scores=s, ratings=batch["ratings"],
                                response_mask=batch["response_mask"])
  return loss, dict(metrics, reward_mean=masked_mean(s, batch["response_mask"]))


def train_step(state, batch, *, graphdef, tx):
  (loss, metrics), grads = jax.value_and_grad(
      functools.partial(batch_loss, graphdef=graphdef), has_aux=True)(state["params"], batch)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
  return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def eval_step(params, batch, *, graphdef):
  loss, metrics = batch_loss(params, batch, graphdef=graphdef)
  return dict(metrics, loss=loss)


# --- loading a trained reward model -----------------------------------------------------------

def abstract_trunk(cfg: ModelConfig):
  """(graphdef, abstract state) of a LLaMA of this config: restore targets, no memory."""
  return nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))


def abstract_head(dim: int) -> dict:
  return jax.eval_shape(lambda: init_head(dim))


def abstract_params(cfg: ModelConfig):
  """(graphdef, abstract {"trunk", "head"}) of a reward model of this config."""
  graphdef, trunk = abstract_trunk(cfg)
  return graphdef, {"trunk": trunk, "head": abstract_head(cfg.dim)}


def load(directory: str, *, mesh, dtype: str | None = None):
  """(graphdef, params) of the latest step of a reward run directory, sharded on `mesh`."""
  run = checkpoints.read_run_config(directory)
  if run.get("loss", {}).get("name") != "bradley_terry":
    raise ValueError(f"{directory}: not a reward-model run (its loss.name is "
                     f"{run.get('loss', {}).get('name')!r}, expected 'bradley_terry')")
  fields = dict(run["model"])
  if dtype:
    fields["dtype"] = dtype
  graphdef, abstract = abstract_params(ModelConfig.from_dict(fields))
  params, _ = checkpoints.restore_params(directory, abstract,
                                         sharding.state_shardings(abstract, mesh))
  return graphdef, params


# --- the loop ---------------------------------------------------------------------------------

def run(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains a reward model as configured; returns a summary with held-out pairwise accuracy."""
  if c.optim.accum_steps not in (0, 1):  # 0, the automatic choice, is one micro-batch here
    raise ValueError(f"optim.accum_steps={c.optim.accum_steps}: the reward trainer takes one "
                     "micro-batch per step; lower data.batch_size instead")
  c = ml_collections.ConfigDict(c.to_dict())  # filled below; the caller's config stays as given
  # config.model and a placeholder data.tokenizer from init_from, as the stages fill theirs.
  checkpoints.fill_model_from_init(c)
  mesh = sharding.make_mesh(dict(c.mesh))
  tokenizer = load_tokenizer(c.data.tokenizer)
  train_src, eval_src = sources(c)
  load_data = functools.partial(
      data.make_loader, tokenizer=tokenizer, global_batch_size=c.data.batch_size,
      max_len=c.data.max_len, num_responses=c.data.num_responses, seed=c.seed,
      worker_count=c.data.worker_count, prompt_format=c.data.prompt_format,
      truncation=c.data.get("truncation", "drop"))
  loader = load_data(train_src)
  # What max_len costs the pairs, said (and, past 5 %, stopped) before any model loads.
  if jax.process_index() == 0:
    print(data_lengths.report(loader.stats, c.data.max_len), flush=True)
  data_lengths.check_loss(loader.stats, c.data.max_len, c.data.get("accept_length_loss", False))
  total = (c.train.steps if c.train.steps > 0
           else math.ceil(c.train.epochs * loader.stats["kept"] / c.data.batch_size))
  tx, schedule = optim.make_optimizer(c.optim, total)

  ckpt_dir = os.path.abspath(os.path.expanduser(c.checkpoint.dir))
  mgr = checkpoints.manager(ckpt_dir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  start = mgr.latest_step()
  it = iter(loader)
  if start is None:
    graphdef, trunk, origin = init_trunk(c, mesh)
    cfg = nnx.merge(graphdef, trunk).cfg
  else:
    cfg = ModelConfig.from_dict(checkpoints.read_run_config(ckpt_dir)["model"])
    origin = f"resumed {ckpt_dir} at step {start}"
  graphdef, abstract = abstract_params(cfg)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {c.data.tokenizer} has {tokenizer.vocab_size} ids but the "
                     f"model's vocab_size is {cfg.vocab_size}")
  param_sh = sharding.state_shardings(abstract, mesh)
  opt_abstract = jax.eval_shape(tx.init, abstract)
  opt_sh = sharding.state_shardings(opt_abstract, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
  if start is None:
    params = jax.device_put({"trunk": trunk, "head": init_head(cfg.dim)}, param_sh)
    with sharding.activate(mesh):
      opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = {"params": params, "opt_state": opt_state,
             "step": jax.device_put(jnp.int32(0), replicated)}
    start = 0
  else:
    state, saved = checkpoints.restore_train_state(
        mgr, start, {"params": abstract, "opt_state": opt_abstract}, state_sh)
    state["step"] = jax.device_put(jnp.int32(start), replicated)
    it.set_state(saved["data_iter"]["iterator"])
  # The run records the model it trained (a checkpoint's own architecture, not config.model).
  c = ml_collections.ConfigDict(c.to_dict())
  c.model = ml_collections.ConfigDict({f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
  if jax.process_index() == 0:
    with open(os.path.join(ckpt_dir, checkpoints.RUN_CONFIG), "w") as f:
      f.write(c.to_json_best_effort(indent=2, sort_keys=True))
    data_lengths.write(loader.stats, os.path.join(ckpt_dir, "data_stats.json"))
  print(f"[{c.checkpoint.dir}] reward model from: {origin}; {total} steps", flush=True)

  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in
              (("tokens", 3), ("loss_mask", 3), ("ratings", 2), ("response_mask", 2), ("cut", 2))
              if k != "cut" or c.data.get("truncation", "drop") == "cut"}
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                    in_shardings=(param_sh, batch_sh))
  logger = train_log.Logger(ckpt_dir, cfg, mesh, tensorboard=c.train.tensorboard,
                            peak_flops_per_device=c.train.peak_flops_per_device)

  def save(step):
    checkpoints.save_train_state(
        mgr, step, state, data_iter={"iterator": it.get_state(),
                                     "process_count": jax.process_count()},
        config=json.loads(c.to_json_best_effort()))

  last, held_out = {}, {}
  t_log, step_log = time.perf_counter(), start
  with sharding.activate(mesh):
    for step in range(start, total):
      local = next(it)
      losses.validate_batch(local, where=f"step {step + 1} batch")
      state, metrics = step_fn(state, sharding.global_batch(local, mesh))
      done = step + 1
      is_save = done % c.checkpoint.save_every == 0 or done == total
      if done % c.train.log_every == 0 or is_save:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(last["loss"]):
          raise FloatingPointError(f"non-finite reward loss at step {done}; the last good "
                                   f"checkpoint in {ckpt_dir} is step {mgr.latest_step()}")
        last["lr"] = float(schedule(done - 1))
        now = time.perf_counter()
        logger.train(done, last, local, (now - t_log) / max(done - step_log, 1))
        t_log, step_log = now, done
      if c.train.eval_every and (done % c.train.eval_every == 0 or done == total):
        held_out = evaluate(c, state["params"], eval_fn, load_data, mesh, eval_src)
        logger.eval(done, held_out)
      if is_save:
        save(done)
    if c.train.eval_every and not held_out:  # a finished run, re-run: its summary still scores
      held_out = evaluate(c, state["params"], eval_fn, load_data, mesh, eval_src)
  mgr.wait_until_finished()
  mgr.close()
  logger.close()
  return {"steps": total, "start": start, "origin": origin, "final": last, "eval": held_out,
          "dir": ckpt_dir, "data": loader.stats, "state": state, "graphdef": graphdef}


class Subset:
  """Rows `index` of a random-access example source, itself one."""

  def __init__(self, source, index):
    self.source, self.index = source, np.asarray(index, np.int64)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i):
    return self.source[int(self.index[i])]


def sources(c) -> tuple[Any, Any]:
  """(train, eval) example sources. With `train.eval_holdout` f > 0 the eval set is a seeded
  fraction f of the train split, left out of training: a small SANDBOX export's validation split
  can hold one or two prompts and no differently rated pair, so no held-out accuracy at all."""
  train_src = data.open_source(c.data, c.data.train_split, c.seed)
  frac = float(c.train.get("eval_holdout", 0.0))
  if frac <= 0:
    return train_src, data.open_source(c.data, c.data.eval_split, c.seed)
  n = len(train_src)
  n_eval = min(max(1, round(frac * n)), n - 1)
  if n_eval < 1:
    raise ValueError(f"train.eval_holdout={frac}: the train split has {n} example(s), too few "
                     "to hold any out")
  perm = np.random.default_rng(c.seed).permutation(n)
  return Subset(train_src, np.sort(perm[n_eval:])), Subset(train_src, np.sort(perm[:n_eval]))


def evaluate(c, params, eval_fn, load_data, mesh, source) -> dict[str, float]:
  """Pairwise accuracy and loss over up to `train.eval_batches` batches of the eval source,
  weighted by each batch's number of comparisons. An eval set smaller than data.batch_size is
  read as one smaller batch (a multiple of the data-parallel devices)."""
  n_dev = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  batch = min(c.data.batch_size, len(source) // n_dev * n_dev)
  if batch < 1:
    raise ValueError(f"the eval set has {len(source)} example(s), fewer than the {n_dev} "
                     "data-parallel devices; set train.eval_every=0 or train.eval_holdout")
  loader = load_data(source, shuffle=False, num_epochs=1, drop_remainder=True,
                     global_batch_size=batch)
  it = iter(loader)
  n = min(c.train.eval_batches, max(1, int(loader.stats["batches_per_epoch"])))
  sums, pairs = {}, 0.0
  for _ in range(n):
    m = {k: float(v) for k, v in jax.device_get(eval_fn(params, sharding.global_batch(
        next(it), mesh))).items()}
    pairs += m["pairs"]
    for k in ("accuracy", "loss", "margin"):
      sums[k] = sums.get(k, 0.0) + m[k] * m["pairs"]
  return {**{k: v / max(pairs, 1.0) for k, v in sums.items()}, "pairs": pairs}


def main(argv):
  from absl import app
  from absl import logging as absl_logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  summary = run(_CONFIG.value)
  print(json.dumps({"dir": summary["dir"], "final": summary["final"], "eval": summary["eval"]},
                   indent=2), flush=True)


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG
  from absl import app
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/reward.py", "Config file, e.g. configs/reward.py:tiny", lock_config=True)
  app.run(main)


if __name__ == "__main__":
  cli()
