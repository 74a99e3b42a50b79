"""The training scaffold every method plugs into: the preference stages and baselines
(train.py), the reward model (reward.py) and PPO (ppo.py).

It owns what must not drift between methods:
- the starting weights, from one `checkpoint.init_from` path (`init_model`: HF directory or hub
  id, a previous run directory, random:<preset>[:seed], or a random init of config.model);
- the abstract state, its shardings and init-or-restore (`Scaffold`); the data position,
  translated when the process count changed since the save (`iterator_state`);
- the optimizer step (`optimizer_step`: gradient accumulation, one optax update, norms);
- the finite check of every step's loss (`Scaffold.check`, read back on logged/saved steps, so
  no step waits on the host);
- saving (`Scaffold.save`) and the metrics writer (`train_log.Logger`, keyed `step`).

A method brings its parameter init, its `loss_fn(params, frozen, batch) -> (loss, metrics)`,
its batch shardings and any extra state. The state is a dict
  {"params": trainable, "opt_state", "step"[, "frozen": not trained]}
`frozen` is the seam between trainable and frozen parameters: a reference model (DPO's, PPO's
pi_ref) copied from the starting params and saved with them, or, under LoRA (`lora_method`), the
base model the adapters sit on, rebuilt from checkpoint.init_from on every start and never saved.
The optimizer sees `params` alone.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.data import data_lengths
from stable_alignment_jax.training import losses
from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model import lora as lora_lib
from stable_alignment_jax.model.presets import ModelConfig, preset

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]  # (params, frozen, batch)


# --- the starting weights ---------------------------------------------------------------------

_RUN_CHOICES = ("dtype", "param_dtype", "remat", "max_seq_len")  # a run's, not the weights'


def _arch(cfg: ModelConfig, skip=_RUN_CHOICES) -> dict:
  return {k: v for k, v in vars(cfg).items() if k not in skip}


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract state) of a LLaMA of this config: restore targets, no memory."""
  return nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The model a fresh run trains: config.model (filled from an init_from checkpoint by
  `checkpoints.fill_model_from_init`), or a random:<preset> with this run's dtype and remat."""
  spec = c.checkpoint.init_from
  if spec.startswith("random:"):
    return preset(spec.split(":")[1], dtype=c.model.dtype, remat=c.model.remat)
  return ModelConfig.from_dict(c.model)


def run_model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The model a run trains: a run being resumed keeps its own record (run_config.json of
  checkpoint.dir, once it holds a saved step), a fresh one takes `model_config`."""
  ckpt_dir = os.path.abspath(os.path.expanduser(c.checkpoint.dir))
  if os.path.exists(os.path.join(ckpt_dir, checkpoints.RUN_CONFIG)):
    with checkpoints.manager(ckpt_dir, read_only=True) as mgr:
      if mgr.latest_step() is not None:
        return ModelConfig.from_dict(checkpoints.read_run_config(ckpt_dir)["model"])
  return model_config(c)


def init_model(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh, shardings=None):
  """(params, origin) of the LLaMA a run starts from, every weight born on its sharding.

  checkpoint.init_from: "" = a random init of `cfg` (seed config.seed); random:<preset>[:seed];
  an HF directory or hub id; a previous run's directory (its latest params; a LoRA stage's: its
  base with the adapters merged in). A checkpoint must describe `cfg`'s architecture
  (config.model was filled from it)."""
  init = c.checkpoint.init_from
  if shardings is None:
    shardings = sharding.state_shardings(abstract_model(cfg)[1], mesh)
  if not init or init.startswith("random:"):
    seed = int(init.split(":")[2]) if init.count(":") >= 2 else (c.seed if not init else 0)
    with sharding.activate(mesh):
      make = lambda: nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(seed)))[1]
      return jax.jit(make, out_shardings=shardings)(), init or "random init"
  path = checkpoints.resolve(init)
  if checkpoints.is_hf_dir(path):
    from stable_alignment_jax.model import convert
    hf = convert.read_hf_config(path)
    skip = _RUN_CHOICES + ("scan_layers",)  # either layout loads from HF
    if _arch(hf, skip) != _arch(cfg, skip):
      raise ValueError(f"checkpoint.init_from={init}: its config.json describes "
                       f"{_arch(hf, skip)}, this config's model is {_arch(cfg, skip)}")
    _, params = checkpoints.load_hf(path, mesh=mesh, **{
        k: getattr(cfg, k) for k in checkpoints.RUN_MODEL_FIELDS + ("max_seq_len",)})
    return params, f"HF checkpoint {init}"
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint.init_from={init!r}: no such directory (expected a "
                            "previous run directory, an HF LLaMA directory or hub id)")
  run = checkpoints.read_run_config(path)
  prev = ModelConfig.from_dict(run["model"])
  if _arch(prev) != _arch(cfg):
    raise ValueError(f"checkpoint.init_from={init}: its model {_arch(prev)} differs from this "
                     f"config's model {_arch(cfg)}")
  # A LoRA run comes back as a plain model: its base rebuilt, its adapters merged (checkpoints).
  lcfg = lora_config(ml_collections.ConfigDict(run))
  params, step = checkpoints.restore_model_params(path, abstract_model(cfg)[1], shardings,
                                                  mesh=mesh)
  base = run.get("checkpoint", {}).get("init_from") or "random init"
  merged = f": rank-{lcfg.rank} adapters merged into {base}" if lcfg.enabled else ""
  return params, f"{path} (step {step}{merged})"


def lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  """The run's LoRA settings (config.lora; off when the config has no such block)."""
  return lora_lib.LoraConfig.from_config(c.get("lora"))


def lora_base(c: ml_collections.ConfigDict, cfg: ModelConfig, lcfg, mesh):
  """shardings -> the frozen base of a LoRA run: checkpoint.init_from as `init_model` loads it
  (fresh and on resume alike: the run directory holds only the adapters), quantized per lcfg."""
  def build(shardings):
    params, origin = init_model(c, cfg, mesh)
    print(f"[{c.checkpoint.dir}] LoRA base (frozen{', ' + lcfg.quantize if lcfg.quantize else ''})"
          f" from: {origin}", flush=True)
    if not lcfg.quantize:
      return params  # the same arrays: no copy
    with sharding.activate(mesh):
      return jax.jit(lambda p: lora_lib.frozen_base(cfg, lcfg, p), out_shardings=shardings,
                     donate_argnums=0)(params)
  return build


def lora_adapters(c: ml_collections.ConfigDict, cfg: ModelConfig, lcfg, mesh, shardings):
  """Fresh adapters (A from config.seed, B zero), born on their shardings."""
  with sharding.activate(mesh):
    return jax.jit(lambda: lora_lib.init_adapters(cfg, lcfg, c.seed), out_shardings=shardings)()


# --- the step ---------------------------------------------------------------------------------

def optimizer_step(state: dict, batch, *, loss_fn: LossFn, tx, accum_steps: int = 1):
  """One optimizer update of state["params"] on `batch`, split into `accum_steps` micro-batches
  scanned in order; `state["frozen"]` reaches the loss untouched. Returns (state, metrics);
  state["step"] is the caller's to count (a PPO iteration is many updates)."""
  params, frozen = state["params"], state.get("frozen")
  grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, frozen, b), has_aux=True)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(params, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def body(acc, mb):
      (l, m), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, acc, (l, m, g)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(
        lambda x: x[0], micro)))
    zero = (zero[0][0], zero[0][1], zero[1])
    (loss, metrics, grads), _ = jax.lax.scan(body, zero, micro)
    loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  params = optax.apply_updates(params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
  return dict(state, params=params, opt_state=opt_state), metrics


def train_step(state, batch, *, loss_fn: LossFn, tx, accum_steps: int = 1):
  """`optimizer_step` counted as one training step."""
  state, metrics = optimizer_step(state, batch, loss_fn=loss_fn, tx=tx, accum_steps=accum_steps)
  return dict(state, step=state["step"] + 1), metrics


# --- the run ----------------------------------------------------------------------------------

def iterator_state(saved: dict, process_count: int) -> dict:
  """The data iterator state to resume with, also when the process count changed.

  Each process reads an interleaved 1/P of the example stream, so `next_index` counts this
  process's examples: P_old * n examples were consumed globally, i.e. P_old * n / P_new per new
  process. Within an epoch this is exact; across epochs the order can differ slightly when
  P_old and P_new drop a different remainder of the epoch.
  """
  state, old = dict(saved["iterator"]), saved.get("process_count", process_count)
  if old != process_count:
    if set(state) != {"next_index"}:
      raise ValueError(f"cannot translate data iterator state {state} from {old} to "
                       f"{process_count} processes")
    state["next_index"] = state["next_index"] * old // process_count
    logging.warning("resuming with %d processes from a %d-process checkpoint: data position "
                    "%s", process_count, old, state)
  return state


@dataclasses.dataclass
class Method:
  """What a training method brings. abstract: its trainable params (shapes, no memory);
  init: shardings -> (params, origin) on a fresh start; frozen: params -> the frozen tree
  (None: the state has none), saved and restored with the state; frozen_init: shardings -> the
  frozen tree, built on every start (fresh or resumed) and never saved (a LoRA base; give
  frozen_abstract with it); extra: names of the JSON items it saves (`Scaffold.save`)."""
  abstract: Any
  init: Callable[[Any], tuple[Any, str]]
  frozen: Callable[[Any], Any] | None = None
  frozen_abstract: Any = None
  extra: tuple[str, ...] = ()
  frozen_init: Callable[[Any], Any] | None = None


class Scaffold:
  """One run directory: its state (restored, or initialised by the method), shardings, data
  position, checkpoints and the finite check. `it`: the data iterator (get_state/set_state)."""

  def __init__(self, c: ml_collections.ConfigDict, mesh, tx, method: Method, it):
    self.c, self.mesh, self.tx, self.it = c, mesh, tx, it
    self.dir = os.path.abspath(os.path.expanduser(c.checkpoint.dir))
    self.mgr = checkpoints.manager(self.dir, keep=c.checkpoint.keep,
                                   async_save=c.checkpoint.async_save)
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_sh = sharding.state_shardings(method.abstract, mesh)
    opt_abstract = jax.eval_shape(tx.init, method.abstract)
    opt_sh = sharding.state_shardings(opt_abstract, mesh)
    self.shardings = {"params": param_sh, "opt_state": opt_sh, "step": self.replicated}
    abstract = {"params": method.abstract, "opt_state": opt_abstract}
    if method.frozen is not None:
      frozen_abstract = jax.eval_shape(method.frozen, method.abstract) \
          if method.frozen_abstract is None else method.frozen_abstract
      self.shardings["frozen"] = sharding.state_shardings(frozen_abstract, mesh)
      abstract["frozen"] = frozen_abstract
    elif method.frozen_init is not None:
      self.shardings["frozen"] = sharding.state_shardings(method.frozen_abstract, mesh)
    self.saves_frozen = method.frozen_init is None
    start = self.mgr.latest_step()
    self.extra: dict = {}
    if start is not None:
      shard = {k: self.shardings[k] for k in abstract}
      state, saved = checkpoints.restore_train_state(self.mgr, start, abstract, shard,
                                                     extra=method.extra)
      it.set_state(iterator_state(saved["data_iter"], jax.process_count()))
      self.extra = {k: saved[k] for k in method.extra}
      self.origin = f"resumed {self.dir} at step {start}"
    else:
      params, self.origin = method.init(param_sh)
      with sharding.activate(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
      state = {"params": params, "opt_state": opt_state}
      if method.frozen is not None:
        with sharding.activate(mesh):
          state["frozen"] = jax.jit(method.frozen, out_shardings=self.shardings["frozen"])(
              params)
      start = 0
    if method.frozen_init is not None:
      state["frozen"] = method.frozen_init(self.shardings["frozen"])
    state["step"] = jax.device_put(jnp.int32(start), self.replicated)
    self.state, self.start = state, start
    self._pending: list[tuple[int, jax.Array]] = []

  def write_run_config(self, c: ml_collections.ConfigDict, stats: dict | None = None) -> None:
    """run_config.json (the run's own record, read by init_from and loaders) and the data's
    counts, on process 0."""
    self.config = json.loads(c.to_json_best_effort())
    if jax.process_index() == 0:
      os.makedirs(self.dir, exist_ok=True)
      with open(os.path.join(self.dir, checkpoints.RUN_CONFIG), "w") as f:
        f.write(c.to_json_best_effort(indent=2, sort_keys=True))
      if stats is not None:
        data_lengths.write(stats, os.path.join(self.dir, "data_stats.json"))

  def jit_step(self, step_fn, batch_sh):
    """step_fn(state, batch) -> (state, metrics) jitted on the state's shardings, donating the
    state."""
    return jax.jit(step_fn, in_shardings=(self.shardings, batch_sh),
                   out_shardings=(self.shardings, None), donate_argnums=0)

  def check(self, step: int, loss: jax.Array, *, now: bool = False) -> None:
    """Queues `step`'s loss for the finite check, done at once with `now` (a logged or saved
    step, whose metrics are fetched anyway): every step is checked, none waits on the host."""
    self._pending.append((step, loss))
    if not now:
      return
    values = np.asarray(jax.device_get([l for _, l in self._pending]))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      first = self._pending[int(bad[0])][0]
      self.mgr.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss at step {first} (steps {self._pending[0][0]}.."
          f"{self._pending[-1][0]} checked); the last good checkpoint in {self.dir} is step "
          f"{self.mgr.latest_step()} and was kept")
    self._pending.clear()

  def save(self, step: int, extra: dict | None = None) -> None:
    """The state, the data position (with the process count, for `iterator_state`), the run
    config and the method's JSON items."""
    state = self.state if self.saves_frozen else \
        {k: v for k, v in self.state.items() if k != "frozen"}
    checkpoints.save_train_state(
        self.mgr, step, state,
        data_iter={"iterator": self.it.get_state(), "process_count": jax.process_count()},
        config=self.config, extra=extra)

  def steps(self, step_fn, total: int, *, logger, schedule):
    """The loop over batches of `self.it` from the start step to `total`: each batch validated,
    stepped, its loss queued for the finite check; logged steps (every train.log_every and each
    save) fetch the metrics and write them, with lr and timing. Yields (step, metrics logged or
    None) after each step, then saves on checkpoint.save_every and the last step, so what the
    caller does at a step (an evaluation) comes before its checkpoint. Call under the mesh."""
    c = self.c
    t_log, step_log = time.perf_counter(), self.start
    for step in range(self.start, total):
      local = next(self.it)
      losses.validate_batch(local, where=f"step {step + 1} batch")
      self.state, metrics = step_fn(self.state, sharding.global_batch(local, self.mesh))
      done = step + 1
      is_save = done % c.checkpoint.save_every == 0 or done == total
      is_log = done % c.train.log_every == 0 or is_save
      self.check(done, metrics["loss"], now=is_log)
      logged = None
      if is_log:
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        logged["lr"] = float(schedule(done - 1))
        now = time.perf_counter()  # metrics were fetched: every step up to here has finished
        logger.train(done, logged, local, (now - t_log) / max(done - step_log, 1))
        t_log, step_log = now, done
      yield done, logged
      if is_save:
        self.save(done)

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()

