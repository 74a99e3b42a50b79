"""PPO on our model (the paper's RLHF baseline, trained there with TRLX), written out.

One iteration: take `rollout_batch` prompts from the data set -> sample responses from the
current policy with our Sampler (in process, batched, on the training mesh) -> score each
response (a reward model from reward.py, or a programmatic reward) -> per-token rewards: the
score on the last response token minus kl_coef * (log pi - log pi_ref) on every response token,
pi_ref the frozen starting policy -> values from a scalar head on the policy's hidden states,
GAE advantages (whitened) and returns -> `epochs` passes over the rollout in shuffled
minibatches of the clipped surrogate + vf_coef * clipped value loss -> the adaptive (or fixed)
KL coefficient moves toward its target. Experience and the update are each one jitted function.

  python -m stable_alignment_jax.training.ppo --config=configs/ppo.py[:tiny]

The run directory holds Orbax items params ({policy, value_head}), opt_state, frozen (pi_ref),
data_iter (the prompt iterator), ppo (kl_coef and the rollout RNG key) and config, so a killed
run resumes with the same rollouts and losses. Its `params["policy"]` is a plain LLaMA state.
"""

import functools
import json
import math
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.data import loader as data, data_lengths
from stable_alignment_jax.training import optim, reward, scaffold, train_log
from stable_alignment_jax.model import sharding
from stable_alignment_jax.training import ppo_losses as pl
from stable_alignment_jax.contracts import bucket
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.model import logprobs, lora
from stable_alignment_jax.data.tokenizer import load_tokenizer

# --- programmatic rewards (tests, smoke runs): (prompts, responses) -> scores [N] -------------

def token_count_reward(prompts, responses, *, tokens, length_cost) -> np.ndarray:
  """Number of response tokens in `tokens`, minus length_cost per response token."""
  wanted = set(int(t) for t in tokens)
  return np.asarray([sum(t in wanted for t in r) - length_cost * len(r) for r in responses],
                    np.float32)


PROGRAMS: dict[str, Callable] = {"token_count": token_count_reward}


# --- the jitted pieces ------------------------------------------------------------------------

def token_logprobs(model, h, tokens, logprob_chunk: int):
  """log p(tokens[:, 1:]) from hidden states h [N, T, D]: [N, T-1]. With logprob_chunk > 0 the
  LM head runs over that many positions at a time (`model.logprobs`), so the whole [N, T, V]
  logits never exist; 0 builds them whole."""
  return logprobs.target_logprobs(h[:, :-1], model.logits, tokens[:, 1:], chunk=logprob_chunk)


def policy_forward(graphdef, params, tokens, logprob_chunk: int = 0, frozen=None):
  """Log-probs of tokens[:, 1:] and the values of the states before them: [N, T-1] each.
  Under LoRA params["policy"] holds the adapters and `frozen` the base they sit on."""
  policy = (params["policy"],) if frozen is None else (params["policy"], frozen)
  model = nnx.merge(graphdef, *policy)
  h, _ = model.hidden(tokens)
  logp = token_logprobs(model, h, tokens, logprob_chunk)
  return logp, reward.apply_head(params["value_head"], h[:, :-1])


def in_chunks(fn, xs, chunk: int):
  """fn over the rows of the arrays xs [N, ...] (a pytree), `chunk` rows at a time: one model
  forward holds [chunk, T, V] logits, not [N, T, V]. Chunk j takes rows j, j + N/chunk, ...,
  so a batch-sharded input splits without moving rows between devices."""
  n = jax.tree.leaves(xs)[0].shape[0]
  strided = jax.tree.map(lambda x: x.reshape(chunk, n // chunk, *x.shape[1:]).swapaxes(0, 1), xs)
  out = jax.lax.map(fn, strided)
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(n, *y.shape[2:]), out)


def experience(params, ref_policy, tokens, mask, scores, kl_coef, *, graphdef, gamma, lam,
               cliprange_reward, chunk, logprob_chunk=0, lora_graphs=None):
  """A sampled batch -> the rollout PPO trains on. tokens [N, T]; mask [N, T-1] on sampled
  tokens (action frame); scores [N]. The forwards run `chunk` rows at a time. Under LoRA
  (`lora_graphs`) ref_policy is the frozen base: the policy is it with the adapters on, pi_ref
  it with them off."""
  def forwards(tok):
    if lora_graphs is None:
      logp, values = policy_forward(graphdef, params, tok, logprob_chunk)
      ref = nnx.merge(graphdef, ref_policy)
    else:
      logp, values = policy_forward(lora_graphs.full, params, tok, logprob_chunk, ref_policy)
      ref = nnx.merge(lora_graphs.base, ref_policy)
    return logp, values, token_logprobs(ref, ref.hidden(tok)[0], tok, logprob_chunk)

  logp, values, ref_logp = in_chunks(forwards, tokens, chunk)
  scores = jnp.clip(scores, -cliprange_reward, cliprange_reward)
  last = pl.last_index(mask)
  rewards = pl.kl_penalty(logp=logp, ref_logp=ref_logp, mask=mask, coef=kl_coef)
  rewards = rewards.at[jnp.arange(tokens.shape[0]), last].add(scores)
  advantages, returns = pl.gae(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
  advantages = pl.whiten(advantages, mask)
  kl = pl.kl_estimate(logp=logp, ref_logp=ref_logp, mask=mask)
  rollout = {"tokens": tokens, "mask": mask, "old_logp": logp * mask, "old_values": values * mask,
             "advantages": advantages, "returns": returns}
  metrics = {"score": jnp.mean(scores), "reward": jnp.mean(jnp.sum(rewards, axis=-1)),
             "kl": jnp.mean(kl), "response_len": jnp.mean(jnp.sum(mask, axis=-1)),
             "value_rollout": pl.masked_mean(values, mask)}
  return rollout, metrics


def ppo_loss(params, mb, *, graphdef, cliprange, cliprange_value, vf_coef, logprob_chunk=0,
             frozen=None):
  logp, values = policy_forward(graphdef, params, mb["tokens"], logprob_chunk, frozen)
  pg, pg_m = pl.policy_loss(logp=logp, old_logp=mb["old_logp"], advantages=mb["advantages"],
                            mask=mb["mask"], cliprange=cliprange)
  vf, vf_m = pl.value_loss(values=values, old_values=mb["old_values"], returns=mb["returns"],
                           mask=mb["mask"], cliprange_value=cliprange_value)
  return pg + vf_coef * vf, {"pg_loss": pg, "vf_loss": vf, **pg_m, **vf_m}


def update(state, rollout, key, *, graphdef, tx, epochs, minibatch, loss_kw, lora=False):
  """`epochs` passes over the rollout in shuffled minibatches, one optimizer step each (the
  scaffold's `optimizer_step`, as the other methods take theirs); one iteration counted.
  lora: the policy is the frozen tree with params["policy"]'s adapters on (graphdef: the
  LoRA model's); else the frozen tree is pi_ref, unused here."""
  n = rollout["tokens"].shape[0]
  loss_fn = lambda params, frozen, mb: ppo_loss(params, mb, graphdef=graphdef,
                                                frozen=frozen if lora else None, **loss_kw)

  def one(state, mb):
    return scaffold.optimizer_step(state, mb, loss_fn=loss_fn, tx=tx)

  def epoch(state, k):
    perm = jax.random.permutation(k, n)
    mbs = jax.tree.map(lambda x: x[perm].reshape(n // minibatch, minibatch, *x.shape[1:]),
                       rollout)
    return jax.lax.scan(one, state, mbs)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["last_loss"] = jax.tree.map(lambda x: x.reshape(-1)[-1], metrics["loss"])
  return dict(state, step=state["step"] + 1), metrics


# --- host side --------------------------------------------------------------------------------

def prompts_of(batch: dict) -> list[list[int]]:
  """The BOS + prompt ids of each example of a loader batch (K = 1): the tokens before the
  first loss-mask position."""
  out = []
  for toks, lm in zip(batch["tokens"][:, 0], batch["loss_mask"][:, 0]):
    out.append(toks[:int(np.argmax(lm > 0))].tolist())
  return out


def layout(prompts, responses, length: int, pad_id: int):
  """Right-padded [N, length] tokens of prompt + response and the action-frame mask [N, length-1]
  (1 where tokens[:, 1:] is a response token)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length - 1), np.float32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    row = (list(p) + list(r))[:length]
    tokens[i, :len(row)] = row
    mask[i, len(p) - 1:len(row) - 1] = 1.0
  return tokens, mask


def check_config(c: ml_collections.ConfigDict, n_batch_devices: int) -> None:
  p = c.ppo
  if p.rollout_batch % p.minibatch:
    raise ValueError(f"ppo.rollout_batch={p.rollout_batch} is not a multiple of "
                     f"ppo.minibatch={p.minibatch}")
  if p.minibatch % n_batch_devices:
    raise ValueError(f"ppo.minibatch={p.minibatch} must split evenly over the "
                     f"{n_batch_devices} data-parallel devices")
  if not c.reward.model and c.reward.program not in PROGRAMS:
    raise ValueError(f"reward.model is empty and reward.program={c.reward.program!r} is not one "
                     f"of {sorted(PROGRAMS)}")
  if jax.process_count() > 1:
    raise NotImplementedError("ppo.run samples from process-local prompts: one process only")


def run(c: ml_collections.ConfigDict, *, stop_after: int = 0) -> dict[str, Any]:
  """Trains a policy with PPO as configured; returns a summary and the per-iteration history.

  `stop_after` > 0 ends the run after that many iterations as a kill would: the schedule is
  still the one of train.steps, and nothing is saved beyond the regular checkpoints.
  """
  c = ml_collections.ConfigDict(c.to_dict())  # filled below; the caller's config stays as given
  # config.model and a placeholder data.tokenizer from init_from, as the stages fill theirs.
  checkpoints.fill_model_from_init(c)
  mesh = sharding.make_mesh(dict(c.mesh))
  check_config(c, math.prod(mesh.shape[a] for a in sharding.BATCH_AXES))
  p = c.ppo
  tok = load_tokenizer(c.data.tokenizer)
  loader = data.make_loader(data.open_source(c.data, c.data.train_split, c.seed), tok,
                            global_batch_size=p.rollout_batch, max_len=p.max_prompt_len + 1,
                            num_responses=1, seed=c.seed, worker_count=c.data.worker_count,
                            prompt_format=c.data.prompt_format, truncation="cut")
  # Only the prompts are read (the stored responses are cut to one token and never trained),
  # so only prompts too long for ppo.max_prompt_len count as lost.
  if jax.process_index() == 0:
    print(data_lengths.report(loader.stats, p.max_prompt_len + 1)
          + "\ndata: (PPO reads the prompts alone: its responses are cut and never trained)",
          flush=True)
  data_lengths.check_loss(loader.stats, p.max_prompt_len + 1,
                          c.data.get("accept_length_loss", False), responses=False)
  it = iter(loader)
  updates_per_iter = p.epochs * (p.rollout_batch // p.minibatch)
  tx, _ = optim.make_optimizer(c.optim, c.train.steps * updates_per_iter)

  cfg = scaffold.run_model_config(c)
  graphdef, abstract_policy = reward.abstract_trunk(cfg)
  room = bucket(max(p.max_prompt_len, 16)) + bucket(p.max_new_tokens)  # the Sampler's buckets
  if room > cfg.max_seq_len:
    raise ValueError(f"ppo.max_prompt_len={p.max_prompt_len} + ppo.max_new_tokens="
                     f"{p.max_new_tokens} take {room} positions in the sampler (powers of two), "
                     f"more than the model's max_seq_len={cfg.max_seq_len}")
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {c.data.tokenizer} has {tok.vocab_size} ids but the policy's "
                     f"vocab_size is {cfg.vocab_size}")
  abstract = {"policy": abstract_policy, "value_head": reward.abstract_head(cfg.dim)}

  def init(sh):
    policy, origin = scaffold.init_model(c, cfg, mesh, sh["policy"])
    head = jax.device_put(reward.init_head(cfg.dim), sh["value_head"])
    return {"policy": policy, "value_head": head}, origin

  lcfg = scaffold.lora_config(c)
  lora_graphs = None
  plain_graphdef = graphdef
  if lcfg.enabled:
    # LoRA: the policy's adapters and the value head train; the frozen tree is the base, which
    # with the adapters off is pi_ref.
    lora_graphs = lora.graphs(cfg, lcfg)
    graphdef = lora_graphs.full
    abstract = {"policy": lora_graphs.adapters, "value_head": abstract["value_head"]}

    def lora_init(sh):
      head = jax.device_put(reward.init_head(cfg.dim), sh["value_head"])
      return ({"policy": scaffold.lora_adapters(c, cfg, lcfg, mesh, sh["policy"]),
               "value_head": head}, f"fresh rank-{lcfg.rank} adapters and value head")
    method = scaffold.Method(abstract=abstract, init=lora_init,
                             frozen_abstract=lora_graphs.frozen,
                             frozen_init=scaffold.lora_base(c, cfg, lcfg, mesh), extra=("ppo",))
  else:
    # pi_ref, the starting policy, is the state's frozen tree.
    method = scaffold.Method(
        abstract=abstract, init=init,
        frozen=lambda params: jax.tree.map(jnp.copy, params["policy"]),
        frozen_abstract=abstract_policy, extra=("ppo",))
  run_ = scaffold.Scaffold(c, mesh, tx, method, it)
  start, origin = run_.start, run_.origin
  if run_.extra:
    kl_coef = float(run_.extra["ppo"]["kl_coef"])
    key = jax.random.wrap_key_data(jnp.asarray(run_.extra["ppo"]["key"], jnp.uint32))
  else:
    kl_coef, key = float(p.init_kl_coef), jax.random.key(c.seed)
  score_fn = _scorer(c, mesh, tok, cfg)
  run_c = ml_collections.ConfigDict(c.to_dict())
  run_c.model = ml_collections.ConfigDict({f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
  run_.write_run_config(run_c, loader.stats)
  print(f"[{c.checkpoint.dir}] policy from: {origin}; {c.train.steps} iterations", flush=True)

  length = p.max_prompt_len + p.max_new_tokens
  logprob_chunk = c.train.get("logprob_chunk", 0)  # as the stages: no whole [N, T, V] logits
  row = lambda n: sharding.batch_sharding(mesh, n)
  rep = run_.replicated
  param_sh = run_.shardings["params"]
  roll_sh = {"tokens": row(2), "mask": row(2), "old_logp": row(2), "old_values": row(2),
             "advantages": row(2), "returns": row(2)}
  exp_fn = jax.jit(functools.partial(experience, graphdef=graphdef, gamma=p.gamma, lam=p.lam,
                                     cliprange_reward=p.cliprange_reward, chunk=p.minibatch,
                                     logprob_chunk=logprob_chunk, lora_graphs=lora_graphs),
                   in_shardings=(param_sh, run_.shardings["frozen"], row(2), row(2), row(1), rep),
                   out_shardings=(roll_sh, None))
  upd_fn = jax.jit(functools.partial(
      update, graphdef=graphdef, tx=tx, epochs=p.epochs, minibatch=p.minibatch,
      loss_kw=dict(cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                   logprob_chunk=logprob_chunk), lora=lora_graphs is not None),
      in_shardings=(run_.shardings, roll_sh, rep), out_shardings=(run_.shardings, None),
      donate_argnums=0)
  logger = train_log.Logger(run_.dir, cfg, mesh, tensorboard=c.train.tensorboard)
  if lora_graphs is None:
    policy_state = lambda: run_.state["params"]["policy"]
  else:  # the sampler decodes a plain model: the adapters merged into (a copy of) the base
    merge_fn = jax.jit(
        lambda f, a: lora.merge(f, a, lcfg, cfg if lcfg.quantize else None),
        out_shardings=sharding.state_shardings(abstract_policy, mesh))
    policy_state = lambda: merge_fn(run_.state["frozen"], run_.state["params"]["policy"])

  history, last = [], {}
  sampling = dict(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                  top_k=p.top_k)
  with sharding.activate(mesh):
    for step in range(start, c.train.steps):
      if stop_after and step >= stop_after:
        break
      prompts = prompts_of(next(it))
      key, k_sample, k_update = jax.random.split(key, 3)
      seeds = np.asarray(jax.random.randint(k_sample, (len(prompts),), 0, 2**31 - 1))
      sampler = Sampler(plain_graphdef, policy_state(), eos_id=tok.stop_ids,
                        pad_id=tok.pad_id, mesh=mesh, min_batch=len(prompts))
      responses = sampler.generate(prompts, [SamplingParams(**sampling, seed=int(s))
                                             for s in seeds])
      tokens, mask = layout(prompts, responses, length, tok.pad_id)
      scores = score_fn(prompts, responses, tokens, mask)
      rollout, em = exp_fn(run_.state["params"], run_.state["frozen"], tokens, mask, scores,
                           jnp.float32(kl_coef))
      run_.state, um = upd_fn(run_.state, rollout, k_update)
      run_.check(step + 1, um["loss"], now=True)  # the rollout needs the host each iteration
      m = {k: float(v) for k, v in jax.device_get({**em, **um}).items()}
      m.update(kl_coef=kl_coef, step=step + 1,
               rollout_crc=zlib.crc32(tokens.tobytes()) ^ zlib.crc32(scores.tobytes()))
      kl_coef = pl.adaptive_kl_coef(kl_coef, m["kl"], target=p.kl_target, horizon=p.kl_horizon,
                                    n_steps=len(prompts))
      history.append(m)
      last = {"prompts": prompts, "responses": responses, "tokens": tokens, "mask": mask,
              "scores": scores, "old_logp": np.asarray(rollout["old_logp"])}
      logger.write("train", step + 1, {k: v for k, v in m.items() if k != "step"})
      if (step + 1) % c.train.log_every == 0:
        print(f"[ppo {step + 1}] score={m['score']:.3f} kl={m['kl']:.3f} "
              f"loss={m['loss']:.4f} kl_coef={kl_coef:.4f}", flush=True)
      if (step + 1) % c.checkpoint.save_every == 0 or step + 1 == c.train.steps:
        run_.save(step + 1, extra={"ppo": {
            "kl_coef": kl_coef, "key": np.asarray(jax.random.key_data(key)).tolist()}})
  run_.close()
  logger.close()
  return {"dir": run_.dir, "start": start, "origin": origin, "history": history,
          "state": run_.state, "policy": policy_state(),
          "graphdef": graphdef, "kl_coef": kl_coef, "last_rollout": last}


def _scorer(c, mesh, tok, policy_cfg):
  """(prompts, responses, tokens, mask) -> clipped-later scores [N] float32 (host numpy)."""
  if not c.reward.model:
    fn = functools.partial(PROGRAMS[c.reward.program], tokens=tuple(c.reward.tokens),
                           length_cost=c.reward.length_cost)
    return lambda prompts, responses, tokens, mask: fn(prompts, responses)
  rm_graphdef, rm_params = reward.load(c.reward.model, mesh=mesh, dtype=c.model.dtype)
  rm_cfg = nnx.merge(rm_graphdef, rm_params["trunk"]).cfg
  if rm_cfg.vocab_size != policy_cfg.vocab_size:
    raise ValueError(f"reward.model={c.reward.model}: vocab_size {rm_cfg.vocab_size} differs "
                     f"from the policy's {policy_cfg.vocab_size} (they must share a tokenizer)")
  @jax.jit
  def scores(params, tokens, loss_mask):
    return in_chunks(lambda x: reward.sequence_scores(rm_graphdef, params, *x),
                     (tokens, loss_mask), c.ppo.minibatch)

  def score(prompts, responses, tokens, mask):
    loss_mask = np.concatenate([np.zeros_like(mask[:, :1]), mask], axis=1)
    with sharding.activate(mesh):
      return np.asarray(scores(rm_params, tokens, loss_mask), np.float32)

  return score


def main(argv):
  from absl import app
  from absl import logging as absl_logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  summary = run(_CONFIG.value)
  print(json.dumps({"dir": summary["dir"], "last": summary["history"][-1:]}, indent=2),
        flush=True)


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG
  from absl import app
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/ppo.py", "Config file, e.g. configs/ppo.py:tiny", lock_config=True)
  app.run(main)


if __name__ == "__main__":
  cli()
