"""Training a stage: state, the one jitted step, the loop, metrics and checkpoints.

Read top to bottom: optimizer -> loss over the [B, K, T] batch -> train step (gradient
accumulation inside, one optax update) -> state init/restore (born sharded) -> the loop.
The state, its init, restore, saving and the finite check are the scaffold's (scaffold.py); the
reference model, when a loss needs one, is its `frozen` tree. The model's graphdef is static.
"""

import functools
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stable_alignment_jax.training import budget, losses, optim, scaffold, train_log
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.data import loader as data, data_lengths
from stable_alignment_jax.model import sharding
from stable_alignment_jax.training.losses import (  # noqa: F401  (re-exported for benchmarks)
    loss_kwargs)
from stable_alignment_jax.model import logprobs, lora
from stable_alignment_jax.model.presets import ModelConfig
from stable_alignment_jax.data.tokenizer import load_tokenizer

DATA_STATS = "data_stats.json"  # the loader's counts and lengths, in the run directory

# --- loss over a batch ------------------------------------------------------------------------

def response_logprobs(graphdef, params, batch, *, logprob_chunk: int = 0, shared_prefix: int = 0):
  """Summed log-probs and counts [B, K] of a [B, K, T] batch: one forward over all its rows.

  logprob_chunk (config `train.logprob_chunk`): > 0 runs the LM head over chunks of that many
  positions from the hidden states, so the [B*K, T, V] f32 logits never exist (see
  `model.logprobs`); 0 builds them whole.
  shared_prefix (config `train.shared_prefix`): P > 0 runs the first P tokens, which the K
  responses of an example share (the prompt), once per example instead of K times: each
  example is one packed row [prompt P | K response tails of T-P] (`Llama.hidden(segments=)`),
  B*(P + K*(T-P)) tokens through the layers instead of B*K*T. A batch where some example's
  rows differ within the first P tokens (other than its empty slots) takes the unpacked forward
  instead (`lax.cond`), so the values never depend on P."""
  b, k, t = batch["tokens"].shape
  tokens = batch["tokens"].reshape(b * k, t)
  loss_mask = batch["loss_mask"].reshape(b * k, t)
  model = merge(graphdef, params)

  # Each branch merges its own model: NNX refuses a module from outside a cond's trace.
  def unpacked(params):
    return merge(graphdef, params).hidden(tokens)[0]

  def packed(params):
    p, x = shared_prefix, batch["tokens"]
    rows = jnp.concatenate([x[:, 0, :p], x[:, :, p:].reshape(b, k * (t - p))], axis=1)
    positions = jnp.concatenate([jnp.arange(p), jnp.tile(jnp.arange(p, t), k)]).astype(jnp.int32)
    h = merge(graphdef, params).hidden(
        rows, positions=jnp.broadcast_to(positions, rows.shape), segments=(p, k))[0]
    d = h.shape[-1]
    prompt = jnp.broadcast_to(h[:, None, :p], (b, k, p, d))
    return jnp.concatenate([prompt, h[:, p:].reshape(b, k, t - p, d)], axis=2).reshape(-1, t, d)

  if 0 < shared_prefix < t and k > 1:
    h = jax.lax.cond(shares_prefix(batch, shared_prefix), packed, unpacked, params)
  else:
    h = unpacked(params)
  logp, n = logprobs.sequence_logprobs(h, model.logits, tokens, loss_mask, chunk=logprob_chunk)
  return logp.reshape(b, k), n.reshape(b, k)


def merge(graphdef, params):
  """The model of `params`: one state, or a tuple of states (a LoRA model's adapters and
  frozen base) merged together."""
  return nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)


def shares_prefix(batch, p: int) -> jax.Array:
  """Whether every example's rows agree on their first p tokens (empty slots excepted)."""
  head = batch["tokens"][:, :, :p]
  same = jnp.all(head == head[:, :1], axis=-1) | (batch["response_mask"] == 0)
  return jnp.all(same)


def loss_table(lc, kinds: list[str]) -> tuple:
  """Which loss trains which kinds: ((loss name, kwargs, kind indices), ...), one row per loss.

  `config.loss.by_kind` maps a kind to a loss (the paper: self-critic data with SFT); every
  other kind takes `config.loss.name`. Each row's kwargs are read from `config.loss` as for a
  single loss, so an unknown name or a bad value fails here, before anything loads."""
  by_kind = dict(lc.get("by_kind") or {})
  rows: dict[str, list[int]] = {}
  for i, kind in enumerate(kinds or [""]):
    rows.setdefault(by_kind.get(kind, lc["name"]), []).append(i)
  return tuple((name, loss_kwargs({**dict(lc), "name": name}), tuple(idx))
               for name, idx in rows.items())


def table_needs_reference(table) -> bool:
  return any(losses.needs_reference(name) for name, _, _ in table)


def batch_loss(params, batch, *, graphdef, table, ref_params=None, logprob_chunk=0,
               shared_prefix=0, ref_graphdef=None):
  """The loss of a [B, K, T] batch under `table` (`loss_by_kind`); the reference is
  `ref_params` merged with `ref_graphdef` (default: `graphdef`)."""
  logprobs = functools.partial(response_logprobs, logprob_chunk=logprob_chunk,
                               shared_prefix=shared_prefix)
  logp, n_tokens = logprobs(graphdef, params, batch)
  ref_logp = None
  if table_needs_reference(table):
    ref_logp = jax.lax.stop_gradient(logprobs(
        graphdef if ref_graphdef is None else ref_graphdef, ref_params, batch)[0])
  return loss_by_kind(logp, n_tokens, batch, table, ref_logp)


def loss_by_kind(logp, n_tokens, batch, table, ref_logp=None):
  """Each example's kind picks its loss (`loss_table`); logp, n_tokens [B, K].

  With one loss this is that loss. With several, each loss runs on the whole batch with the
  other kinds' responses masked out, so it averages over its own examples; the step's loss is
  those means weighted by their example counts (= the mean over examples of each one's own
  loss). The shared metrics are weighted the same way; `loss/<name>` and `share/<name>` say
  what each loss did."""
  def one(name, kwargs, response_mask):
    extra = {"ref_logp": ref_logp} if losses.needs_reference(name) else {}
    return losses.get_loss(name)(logp=logp, n_tokens=n_tokens, response_mask=response_mask,
                                 ratings=batch["ratings"], **kwargs, **extra)

  if len(table) == 1:
    name, kwargs, _ = table[0]
    return one(name, kwargs, batch["response_mask"])
  kind = batch["kind"]
  present = jnp.any(batch["response_mask"] > 0, axis=-1)
  parts = []
  for name, kwargs, idx in table:
    mine = jnp.isin(kind, jnp.asarray(idx, kind.dtype)) & present
    loss, m = one(name, kwargs, batch["response_mask"] * mine[:, None])
    parts.append((name, jnp.sum(mine.astype(jnp.float32)), loss, m))
  n_all = jnp.maximum(sum(w for _, w, _, _ in parts), 1.0)
  total, metrics = 0.0, {}
  for name, w, loss, m in parts:
    total = total + w / n_all * loss
    for k, v in m.items():
      metrics[k] = metrics.get(k, 0.0) + w / n_all * v
    metrics[f"loss/{name}"] = loss
    metrics[f"share/{name}"] = w / n_all
  return total, metrics


def shared_prefix_for(setting: int, min_prompt_len: int, max_len: int) -> tuple[int, str]:
  """The `shared_prefix` a run's step takes, and why. setting (config `train.shared_prefix`):
  -1 = the data's shortest prompt (the loader's `min_prompt_len`: every row of every batch
  starts with that many tokens of its example's prompt); 0 = none; P > 0 = P (a batch that does
  not share them takes the unpacked forward: slower, same values)."""
  if setting == -1:
    p = min(min_prompt_len, max_len - 1)
    return p, f"auto: the shortest prompt of the data is {min_prompt_len} tokens"
  if setting < -1 or setting >= max_len:
    raise ValueError(f"train.shared_prefix={setting}: give -1 (auto), 0 (off) or a length below "
                     f"data.max_len={max_len}")
  return setting, "set by train.shared_prefix" if setting else "off (train.shared_prefix=0)"


# --- the step ---------------------------------------------------------------------------------

def preference_loss(params, frozen, batch, *, graphdef, table, logprob_chunk=0, shared_prefix=0,
                    lora_graphs=None):
  """The method's `loss_fn` for the scaffold: `frozen` is the reference model (or None); under
  LoRA (`lora_graphs`, model/lora.py) it is the base, the policy is base + adapters (`params`)
  and the reference the base with adapters off."""
  kw = dict(table=table, logprob_chunk=logprob_chunk, shared_prefix=shared_prefix)
  if lora_graphs is None:
    return batch_loss(params, batch, graphdef=graphdef, ref_params=frozen, **kw)
  return batch_loss((params, frozen), batch, graphdef=lora_graphs.full, ref_params=frozen,
                    ref_graphdef=lora_graphs.base, **kw)


def train_step(state, batch, *, graphdef, tx, table, accum_steps, logprob_chunk=0,
               shared_prefix=0, lora_graphs=None):
  """One optimizer update (`scaffold.train_step`); the batch is split into `accum_steps`
  micro-batches scanned in order."""
  loss_fn = functools.partial(preference_loss, graphdef=graphdef, table=table,
                              logprob_chunk=logprob_chunk, shared_prefix=shared_prefix,
                              lora_graphs=lora_graphs)
  return scaffold.train_step(state, batch, loss_fn=loss_fn, tx=tx, accum_steps=accum_steps)


def eval_step(state, batch, *, graphdef, table, logprob_chunk=0, shared_prefix=0,
              lora_graphs=None):
  loss, metrics = preference_loss(state["params"], state.get("frozen"), batch, graphdef=graphdef,
                                  table=table, logprob_chunk=logprob_chunk,
                                  shared_prefix=shared_prefix, lora_graphs=lora_graphs)
  return dict(metrics, loss=loss)


# --- state ------------------------------------------------------------------------------------

def _config_json(c) -> str:
  return c.to_json_best_effort(indent=2, sort_keys=True)


def check_config(c: ml_collections.ConfigDict, explicit=None) -> None:
  """Fails before any compute on settings that cannot work. With a checkpoint.init_from (HF or a
  previous run), first fills config.model (and a placeholder data.tokenizer) from it, in place;
  `explicit`: the
  keys the user set on the command line (see `checkpoints.fill_model_from_init`)."""
  # An unknown loss (also in loss.by_kind) or a bad loss.* value fails before any download.
  table = loss_table(c.loss, [""] + list(c.loss.get("by_kind") or {}))
  scaffold.lora_config(c)  # a bad lora.* value too
  init = c.checkpoint.init_from
  if init:
    path = checkpoints.resolve(init)  # a hub id is downloaded here, before any compute
    if not os.path.isdir(path):
      raise FileNotFoundError(f"checkpoint.init_from={init!r}: no such directory (expected a "
                              "previous stage's run directory, an HF LLaMA directory or hub id)")
    if not checkpoints.is_hf_dir(path):
      checkpoints.read_run_config(path)  # raises naming the directory when it is not a run
    checkpoints.fill_model_from_init(c, explicit)
  ModelConfig.from_dict(c.model)
  if table_needs_reference(table) and not c.checkpoint.init_from:  # dpo, ipo, cdpo, ...
    logging.warning("%s without checkpoint.init_from: the reference model is a random init",
                    ", ".join(n for n, _, _ in table if losses.needs_reference(n)))
  if c.optim.accum_steps < 0:
    raise ValueError(f"optim.accum_steps={c.optim.accum_steps}: give a positive count, or 0 to "
                     "choose it from the devices' memory (budget.py)")
  if c.data.batch_size % max(c.optim.accum_steps, 1):
    raise ValueError(f"data.batch_size={c.data.batch_size} is not divisible by "
                     f"optim.accum_steps={c.optim.accum_steps}")
  shared_prefix_for(c.train.get("shared_prefix", 0), 0, c.data.max_len)


# --- the loop ---------------------------------------------------------------------------------

def run(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains one stage as configured; returns a summary (final metrics, steps, paths)."""
  check_config(c)
  cfg = ModelConfig.from_dict(c.model)
  mesh = sharding.make_mesh(dict(c.mesh))
  tokenizer = load_tokenizer(c.data.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {c.data.tokenizer} has {tokenizer.vocab_size} ids but "
                     f"model.vocab_size is {cfg.vocab_size}")
  load = functools.partial(data.make_loader, tokenizer=tokenizer,
                           global_batch_size=c.data.batch_size, max_len=c.data.max_len,
                           num_responses=c.data.num_responses, seed=c.seed,
                           worker_count=c.data.worker_count,
                           prompt_format=c.data.get("prompt_format", "auto"),
                           truncation=c.data.get("truncation", "drop"))
  # Always a mixture (one entry without data.mixture), so every batch carries its `kind`.
  loader = load(data.open_mixture(c.data, c.data.train_split, c.seed))
  # What max_len costs each kind, said before any model loads; too much stops the run here.
  if jax.process_index() == 0:
    print(data_lengths.report(loader.stats, c.data.max_len), flush=True)
  data_lengths.check_loss(loader.stats, c.data.max_len, c.data.get("accept_length_loss", False))
  table = loss_table(c.loss, loader.stats["kinds"])
  # The eval split is opened once, on the first evaluation, and read from the start each time.
  eval_source = functools.cache(lambda: data.open_mixture(c.data, c.data.eval_split, c.seed))
  epoch = loader.stats["epoch_examples"]
  total = (c.train.steps if c.train.steps > 0
           else math.ceil(c.train.epochs * epoch / c.data.batch_size))
  tx, schedule = optim.make_optimizer(c.optim, total)

  graphdef, abstract = scaffold.abstract_model(cfg)
  needs_ref = table_needs_reference(table)
  it = iter(loader)
  lcfg = scaffold.lora_config(c)
  lora_graphs = None
  if lcfg.enabled:
    # LoRA: adapters trained, the base frozen (and the reference: adapters off).
    lora_graphs = lora.graphs(cfg, lcfg)
    graphdef = lora_graphs.full
    method = scaffold.Method(
        abstract=lora_graphs.adapters,
        init=lambda sh: (scaffold.lora_adapters(c, cfg, lcfg, mesh, sh),
                         f"fresh rank-{lcfg.rank} adapters"),
        frozen_init=scaffold.lora_base(c, cfg, lcfg, mesh), frozen_abstract=lora_graphs.frozen)
  else:
    # The reference model (DPO-style losses) is the starting params, frozen beside them.
    method = scaffold.Method(
        abstract=abstract, init=lambda sh: scaffold.init_model(c, cfg, mesh, sh),
        frozen=(lambda p: jax.tree.map(jnp.copy, p)) if needs_ref else None)
  run_ = scaffold.Scaffold(c, mesh, tx, method, it)
  start, origin, ckpt_dir, state_sh = run_.start, run_.origin, run_.dir, run_.shardings
  run_.write_run_config(c, loader.stats)
  logging.info("stage %s: params from %s; %d steps, data %s", c.checkpoint.dir, origin, total,
               loader.stats)
  print(f"[{c.checkpoint.dir}] params loaded from: {origin}", flush=True)

  print(f"[{c.checkpoint.dir}] losses by kind: "
        + "; ".join(f"{name}: {[loader.stats['kinds'][i] for i in idx]}"
                    for name, _, idx in table), flush=True)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in
              (("tokens", 3), ("loss_mask", 3), ("ratings", 2), ("response_mask", 2),
               ("kind", 1), ("cut", 2))
              if k != "cut" or c.data.get("truncation", "drop") == "cut"}
  chunk = c.train.get("logprob_chunk", 0)
  accum, why = budget.auto_accum_steps(c, mesh)
  print(f"[{c.checkpoint.dir}] {accum} micro-batch(es) a step ({why})", flush=True)
  prefix, why = shared_prefix_for(c.train.get("shared_prefix", 0), loader.stats["min_prompt_len"],
                                  c.data.max_len)
  print(f"[{c.checkpoint.dir}] shared prefix {prefix} tokens ({why})", flush=True)
  step_fn = run_.jit_step(
      functools.partial(train_step, graphdef=graphdef, tx=tx, table=table,
                        accum_steps=accum, logprob_chunk=chunk, shared_prefix=prefix,
                        lora_graphs=lora_graphs), batch_sh)

  @functools.cache
  def eval_fn_for(kinds: tuple):  # the eval split's own kinds (the stage's data alone)
    eval_table = loss_table(c.loss, list(kinds))
    if table_needs_reference(eval_table) and not needs_ref and lora_graphs is None:
      raise ValueError(f"the eval split's kinds {kinds} take a loss with a reference model "
                       "that the training kinds do not; set train.eval_every=0 or data.mixture")
    return jax.jit(functools.partial(eval_step, graphdef=graphdef, table=eval_table,
                                     logprob_chunk=chunk, shared_prefix=prefix,
                                     lora_graphs=lora_graphs),
                   in_shardings=(state_sh, batch_sh))
  logger = train_log.Logger(ckpt_dir, cfg, mesh, tensorboard=c.train.tensorboard,
                            reference=needs_ref,
                            peak_flops_per_device=c.train.peak_flops_per_device,
                            shared_prefix=prefix)
  if logger.jsonl:  # the data's counts beside the run's metrics
    logger.jsonl.write(json.dumps({"split": "data", "step": start, "entries": [
        {k: e[k] for k in ("kind", "dataset", "examples", "kept", "dropped", "responses",
                           "responses_left_out", "responses_cut")}
        for e in loader.stats["entries"]]}) + "\n")
    logger.jsonl.flush()

  last = {}
  from tqdm import tqdm
  bar = tqdm(initial=start, total=total, desc=c.checkpoint.dir,
             disable=jax.process_index() != 0, mininterval=2.0)
  with sharding.activate(mesh):
    for done, logged in run_.steps(step_fn, total, logger=logger, schedule=schedule):
      bar.update(1)
      if logged:
        last = logged
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
      if c.train.eval_every and (done % c.train.eval_every == 0 or done == total):
        src = eval_source()
        logger.eval(done, evaluate(src, c.train.eval_batches, run_.state,
                                   eval_fn_for(tuple(src.kinds)), load, mesh))
  bar.close()
  run_.close()
  logger.close()
  return {"steps": total, "start": start, "origin": origin, "final": last, "dir": ckpt_dir,
          "data": loader.stats, "state": run_.state}


def evaluate(source, n_batches: int, state, eval_fn, load, mesh) -> dict[str, float]:
  """Mean loss and metrics over the first `n_batches` batches of `source` (the eval split)."""
  loader = load(source, shuffle=False)
  it, sums = iter(loader), {}
  n = min(n_batches, max(1, int(loader.stats["batches_per_epoch"])))
  for _ in range(n):
    m = jax.device_get(eval_fn(state, sharding.global_batch(next(it), mesh)))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: v / n for k, v in sums.items()}
