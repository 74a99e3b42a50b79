"""The reward model of the RLHF baseline: our LLaMA with a scalar head, Bradley–Terry trained.

r(prompt, response) = w . h_last + b, where h_last is the trunk's final hidden state at the
response's last token (its EOS when it has one): the one position that has read the whole
response. Training data is the [B, K, T] batch of DESIGN.md; every pair of valid responses of a
prompt with different ratings is one comparison (HH-RLHF: chosen vs rejected; SANDBOX imitation
groups: all pairs), and the loss is -log sigmoid(r_better - r_worse) averaged over comparisons
(Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022).

  python -m stable_alignment_jax.training.reward --config=configs/reward.py[:tiny]

The run directory is a training run like train.py's (Orbax items params, opt_state, data_iter,
config; run_config.json), with params = {"trunk": llama state, "head": {"w", "b"}}; `load`
reads it back for PPO.
"""

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.data import loader as data, data_lengths
from stable_alignment_jax.training import optim, scaffold, train_log
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import lora
from stable_alignment_jax.model.presets import ModelConfig
from stable_alignment_jax.training.ppo_losses import last_index, masked_mean
from stable_alignment_jax.data.tokenizer import load_tokenizer

METHOD = "reward"  # config.method of a reward-model run

# --- the scalar head ------------------------------------------------------------------------

def init_head(dim: int) -> dict:
  """A zero head: every response starts with reward 0, so the first gradients come from the
  comparisons alone (and a PPO value head starts by predicting 0)."""
  return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def apply_head(head: dict, h: jax.Array) -> jax.Array:
  """[..., D] hidden states -> [...] f32 scalars."""
  return jnp.einsum("...d,d->...", h.astype(jnp.float32), head["w"]) + head["b"]


def init_trunk(c: ml_collections.ConfigDict, mesh, spec: str | None = None):
  """(graphdef, params, origin) of the LLaMA a run starts from (`scaffold.init_model`): `spec`
  (default checkpoint.init_from), or a random init of config.model when empty. A checkpoint
  brings its own architecture (config.model is filled from it), with this run's remat."""
  if spec is not None:
    c = ml_collections.ConfigDict(c.to_dict())
    c.checkpoint.init_from = spec
  checkpoints.fill_model_from_init(c)
  cfg = scaffold.model_config(c)
  params, origin = scaffold.init_model(c, cfg, mesh)
  return abstract_trunk(cfg)[0], params, origin


def sequence_scores(graphdef, params, tokens, loss_mask, frozen=None):
  """Reward of each row of tokens [N, T] at its last loss-mask token. [N] f32. Under LoRA
  params["trunk"] holds the adapters and `frozen` the base they sit on."""
  trunk = (params["trunk"],) if frozen is None else (params["trunk"], frozen)
  h, _ = nnx.merge(graphdef, *trunk).hidden(tokens)
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


def batch_loss(params, batch, *, graphdef, frozen=None):
  b, k, t = batch["tokens"].shape
  s = sequence_scores(graphdef, params, batch["tokens"].reshape(b * k, t),
                      batch["loss_mask"].reshape(b * k, t), frozen).reshape(b, k)
  loss, metrics = bradley_terry(scores=s, ratings=batch["ratings"],
                                response_mask=batch["response_mask"])
  return loss, dict(metrics, reward_mean=masked_mean(s, batch["response_mask"]))


def reward_loss(params, frozen, batch, *, graphdef):
  """The method's `loss_fn` for the scaffold (frozen: None, or the LoRA base)."""
  return batch_loss(params, batch, graphdef=graphdef, frozen=frozen)


def eval_step(params, frozen, batch, *, graphdef):
  loss, metrics = batch_loss(params, batch, graphdef=graphdef, frozen=frozen)
  return dict(metrics, loss=loss)


# --- loading a trained reward model -----------------------------------------------------------

def abstract_trunk(cfg: ModelConfig):
  """(graphdef, abstract state) of a LLaMA of this config: restore targets, no memory."""
  return scaffold.abstract_model(cfg)


def abstract_head(dim: int) -> dict:
  return jax.eval_shape(lambda: init_head(dim))


def abstract_params(cfg: ModelConfig):
  """(graphdef, abstract {"trunk", "head"}) of a reward model of this config."""
  graphdef, trunk = abstract_trunk(cfg)
  return graphdef, {"trunk": trunk, "head": abstract_head(cfg.dim)}


def load(directory: str, *, mesh, dtype: str | None = None):
  """(graphdef, params) of the latest step of a reward run directory, sharded on `mesh`."""
  run = checkpoints.read_run_config(directory)
  if run.get("method") != METHOD:
    raise ValueError(f"{directory}: not a reward-model run (its config.method is "
                     f"{run.get('method')!r}, expected {METHOD!r})")
  fields = dict(run["model"])
  if dtype:
    fields["dtype"] = dtype
  cfg = ModelConfig.from_dict(fields)
  lcfg = scaffold.lora_config(ml_collections.ConfigDict(run))
  if lcfg.enabled:
    return _load_lora(directory, run, cfg, lcfg, mesh)
  graphdef, abstract = abstract_params(cfg)
  params, _ = checkpoints.restore_params(directory, abstract,
                                         sharding.state_shardings(abstract, mesh))
  return graphdef, params


def _load_lora(directory, run, cfg, lcfg, mesh):
  """A LoRA reward run: its base rebuilt from the run's checkpoint.init_from, its adapters
  and head restored, the adapters merged into a plain trunk."""
  g = lora.graphs(cfg, lcfg)
  abstract = {"trunk": g.adapters, "head": abstract_head(cfg.dim)}
  params, _ = checkpoints.restore_params(directory, abstract,
                                         sharding.state_shardings(abstract, mesh))
  c = ml_collections.ConfigDict(run)
  frozen = scaffold.lora_base(c, cfg, lcfg, mesh)(
      sharding.state_shardings(g.frozen, mesh))
  graphdef, plain = abstract_trunk(cfg)
  with sharding.activate(mesh):
    trunk = jax.jit(lambda f, a: lora.merge(f, a, lcfg, cfg if lcfg.quantize else None),
                    out_shardings=sharding.state_shardings(plain, mesh))(frozen, params["trunk"])
  return graphdef, {"trunk": trunk, "head": params["head"]}


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

  # A resumed run's model is its own record (a checkpoint's architecture, not config.model).
  cfg = scaffold.run_model_config(c)
  graphdef, abstract = abstract_params(cfg)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {c.data.tokenizer} has {tokenizer.vocab_size} ids but the "
                     f"model's vocab_size is {cfg.vocab_size}")

  def init(sh):
    trunk, origin = scaffold.init_model(c, cfg, mesh, sh["trunk"])
    return {"trunk": trunk, "head": jax.device_put(init_head(cfg.dim), sh["head"])}, origin

  lcfg = scaffold.lora_config(c)
  if lcfg.enabled:  # adapters and the head trained, the trunk's base frozen
    g = lora.graphs(cfg, lcfg)
    graphdef, abstract = g.full, {"trunk": g.adapters, "head": abstract["head"]}

    def lora_init(sh):
      return ({"trunk": scaffold.lora_adapters(c, cfg, lcfg, mesh, sh["trunk"]),
               "head": jax.device_put(init_head(cfg.dim), sh["head"])},
              f"fresh rank-{lcfg.rank} adapters and head")
    method = scaffold.Method(abstract=abstract, init=lora_init, frozen_abstract=g.frozen,
                             frozen_init=scaffold.lora_base(c, cfg, lcfg, mesh))
  else:
    method = scaffold.Method(abstract=abstract, init=init)
  it = iter(loader)
  run_ = scaffold.Scaffold(c, mesh, tx, method, it)
  start, origin = run_.start, run_.origin
  # The run records the model it trained.
  c.model = ml_collections.ConfigDict({f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
  run_.write_run_config(c, loader.stats)
  print(f"[{c.checkpoint.dir}] reward model from: {origin}; {total} steps", flush=True)

  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in
              (("tokens", 3), ("loss_mask", 3), ("ratings", 2), ("response_mask", 2), ("cut", 2))
              if k != "cut" or c.data.get("truncation", "drop") == "cut"}
  step_fn = run_.jit_step(functools.partial(
      scaffold.train_step, loss_fn=functools.partial(reward_loss, graphdef=graphdef), tx=tx),
      batch_sh)
  eval_jit = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                     in_shardings=(run_.shardings["params"], run_.shardings.get("frozen"),
                                   batch_sh))
  # The frozen tree is read at each call: the train step donates and returns the whole state.
  eval_fn = lambda params, batch: eval_jit(params, run_.state.get("frozen"), batch)
  logger = train_log.Logger(run_.dir, cfg, mesh, tensorboard=c.train.tensorboard,
                            peak_flops_per_device=c.train.peak_flops_per_device)

  last, held_out = {}, {}
  with sharding.activate(mesh):
    for done, logged in run_.steps(step_fn, total, logger=logger, schedule=schedule):
      last = logged or last
      if c.train.eval_every and (done % c.train.eval_every == 0 or done == total):
        held_out = evaluate(c, run_.state["params"], eval_fn, load_data, mesh, eval_src)
        logger.eval(done, held_out)
    if c.train.eval_every and not held_out:  # a finished run, re-run: its summary still scores
      held_out = evaluate(c, run_.state["params"], eval_fn, load_data, mesh, eval_src)
  run_.close()
  logger.close()
  return {"steps": total, "start": start, "origin": origin, "final": last, "eval": held_out,
          "dir": run_.dir, "data": loader.stats, "state": run_.state, "graphdef": graphdef}


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
