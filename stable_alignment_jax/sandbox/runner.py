"""Starting, continuing and resuming a SANDBOX run over its store.

A run is a fixed plan of steps (round, step index, central agents), derived from the config and
seed alone. `start` checks everything that can be checked (config, question and prior files,
backends and API keys) before it creates the store; `resume` rebuilds the world from the store
and runs the steps not yet marked complete.
"""

import collections
import json
import os
import sys
import time

import ml_collections
import numpy as np

from stable_alignment_jax.sandbox import back_scatter, embedders, judging, prompts as prompts_lib
from stable_alignment_jax.sandbox import world as world_lib
from stable_alignment_jax.sandbox.agents import Agent
from stable_alignment_jax.sandbox.backends import check_backend_config, make_backend
from stable_alignment_jax.sandbox.backends.replay import CallLog
from stable_alignment_jax.sandbox.memory import Memory
from stable_alignment_jax.sandbox.store import Store

ROLES = ("draft", "feedback", "revise", "observe")


def store_path(cfg) -> str:
  return cfg.store or os.path.join(cfg.run_dir, f"{cfg.run_id}.sqlite")


def _used_backends(cfg) -> list[str]:
  names = {g.backend for g in cfg.agent_models.values()} | {cfg.observer.backend}
  for name in sorted(names):
    if name not in cfg.backends:
      raise KeyError(f"config names backend {name!r}, not in config.backends "
                     f"({sorted(cfg.backends)})")
    check_backend_config(name, cfg.backends[name])
  return sorted(names)


def make_backends(cfg) -> dict:
  """The backends the society uses, each checked against the model names sent to it."""
  names: dict[str, set] = collections.defaultdict(set)
  for g in cfg.agent_models.values():
    names[g.backend].add(g.model)
  names[cfg.observer.backend].add(cfg.observer.model)
  return {n: make_backend(n, cfg.backends[n], sorted(names[n])) for n in _used_backends(cfg)}


def validate(cfg) -> tuple[list[str], list[dict] | None, prompts_lib.Prompts]:
  """Checks the config and reads the inputs; raises with the offending key or file."""
  for role in ROLES:
    if role not in cfg.sampling:
      raise KeyError(f"config.sampling.{role}: missing (need max_tokens, temperature, top_p)")
  if cfg.memory.accept not in ("better", "revised"):
    raise ValueError(f"config.memory.accept={cfg.memory.accept!r}: expected better or revised")
  if cfg.rounds < 1:
    raise ValueError(f"config.rounds={cfg.rounds}: must be >= 1")
  for name, g in cfg.agent_models.items():
    missing = [k for k in ("backend", "model", "count") if k not in g]
    if missing:
      raise KeyError(f"config.agent_models.{name}: missing {missing}")
  for name in _used_backends(cfg):
    judging.uses_choice(cfg, name)  # an unknown mode, or choice on a backend that cannot
  prompts = prompts_lib.Prompts(cfg.prompts.to_dict())
  questions = world_lib.load_questions(cfg.world.question_file, cfg.world.max_question_chars)
  priors = world_lib.load_priors(cfg.world.prior_file) if cfg.world.prior_file else None
  world_lib.assign_models(cfg.agent_models, cfg.world.n_agents)
  world_lib.prior_kinds(cfg.world.setting, cfg.world.n_agents)
  return questions, priors, prompts


def plan(cfg) -> list[tuple[int, int, list[int]]]:
  out = []
  per_step = cfg.agents_per_step
  for r in range(cfg.rounds):
    active = world_lib.active_agents(cfg.world.n_agents, cfg.agents_per_round, cfg.seed, r)
    size = len(active) if per_step <= 0 else per_step
    for s, i in enumerate(range(0, len(active), size)):
      out.append((r, s, active[i:i + size]))
  return out


def start(cfg, *, replay: str | None = None, progress: bool = True,
          max_steps: int | None = None, backends: dict | None = None) -> str:
  """Creates the store for a new run and runs it; returns the store path.

  `backends`: already built backends ({name: backend}, e.g. from `make_backends(cfg)`), so a
  caller running several societies loads its checkpoints once; default: built from the config.
  """
  path = store_path(cfg)
  if os.path.exists(path):
    raise FileExistsError(f"{path}: run store exists; use `resume` to continue it")
  questions, priors, _ = validate(cfg)
  embedder = embedders.make_embedder(cfg.embedder)
  if replay:
    backends = {}
  elif backends is None:
    backends = make_backends(cfg)
  agents = world_lib.build_agents(cfg.world, cfg.seed, cfg.agent_models, embedder.embed, priors)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Build the initial store under a temporary name, then rename: a kill during setup leaves no
  # half-initialised store behind.
  tmp = path + ".init"
  for suffix in ("", "-wal", "-shm"):
    if os.path.exists(tmp + suffix):
      os.remove(tmp + suffix)
  store = Store(tmp, create=True)
  with store.transaction():
    store.set_meta("config", json.loads(cfg.to_json()))
    store.set_meta("run_id", cfg.run_id)
    store.set_meta("question_digest", world_lib.file_digest(cfg.world.question_file))
    store.set_meta("replay", replay)
    store.set_meta("embedder", embedder.name)
    for a in agents:
      store.add_agent(a.id, a.x, a.y, a.backend, a.model, a.prior_kind)
      for seq, (q, ans, v) in enumerate(zip(a.memory.questions, a.memory.answers,
                                                 a.memory.embeddings())):
        store.add_memory(a.id, seq, q, ans, v, -1)
  store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
  store.close()
  os.replace(tmp, path)
  _continue(path, backends, embedder, replay, progress, max_steps)
  return path


def resume(path: str, *, replay: str | None = None, progress: bool = True,
           max_steps: int | None = None, backends: dict | None = None) -> str:
  store = Store(path)
  cfg = ml_collections.ConfigDict(store.get_meta("config"))
  replay = replay or store.get_meta("replay")
  digest = store.get_meta("question_digest")
  store.close()
  validate(cfg)
  if world_lib.file_digest(cfg.world.question_file) != digest:
    raise ValueError(f"{cfg.world.question_file}: changed since the run started (sha256 differs); "
                     "resuming would draw different questions")
  embedder = embedders.make_embedder(cfg.embedder)
  if replay:
    backends = {}
  elif backends is None:
    backends = make_backends(cfg)
  _continue(path, backends, embedder, replay, progress, max_steps)
  return path


def load_agents(store: Store) -> list[Agent]:
  agents = [Agent(i, x, y, b, m, k, None) for i, x, y, b, m, k in store.agents()]
  mems: dict[int, list] = collections.defaultdict(list)
  for agent, _seq, q, a, v, _r in store.memories():
    mems[agent].append((q, a, v))
  for ag in agents:
    rows = mems.get(ag.id, [])
    ag.memory = Memory()
    for q, a, v in rows:
      ag.memory.add(q, a, v)
  return agents


def _cached_embedder(store: Store, embedder, replay: Store | None):
  def embed(texts: list[str]) -> np.ndarray:
    unique = list(dict.fromkeys(texts))
    found = store.lookup_embeddings(embedder.name, unique)
    if replay is not None:
      found.update(replay.lookup_embeddings(embedder.name, [t for t in unique if t not in found]))
    missing = [t for t in unique if t not in found]
    if missing:
      found.update(zip(missing, embedder.embed(missing)))
    new = [(t, found[t]) for t in unique]
    with store.transaction():
      store.add_embeddings(embedder.name, new)
    return np.stack([found[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)
  return embed


def _step_counters(episodes: list[dict]) -> dict:
  """Totals, nulls, and the numbers read by each source (`*_choice`, `*_text`)."""
  c = collections.Counter()
  for ep in episodes:
    c["feedback_total"] += len(ep["feedback"])
    c["feedback_unparsed"] += sum(f["rating"] is None for f in ep["feedback"])
    for f in ep["feedback"]:
      if f["rating"] is not None:
        c[f"feedback_{f.get('rating_source', 'text')}"] += 1
    for part in ("draft", "revised"):
      for field in ("moral", "engagement"):
        c["observer_total"] += 1
        c["observer_unparsed"] += ep[part][field] is None
        if ep[part][field] is not None:
          c[f"observer_{ep[part].get(field + '_source', 'text')}"] += 1
  return dict(c)


def announce_choice_readings(cfg, calls: CallLog, store: Store) -> dict:
  """Learns, once per backend and model, whether ratings can be read as verified choices
  (backends/choice_reading.py), says so on stderr and keeps it in the store for `status`."""
  models: dict[str, set] = collections.defaultdict(set)
  for g in cfg.agent_models.values():
    models[g.backend].add(g.model)
  models[cfg.observer.backend].add(cfg.observer.model)
  models = {n: sorted(ms) for n, ms in models.items() if judging.uses_choice(cfg, n)}
  readings = calls.choice_readings(models)
  for r in readings.values():
    print(f"sandbox: {r['line']}", file=sys.stderr)
  if readings:
    with store.transaction():
      store.set_meta("choice_readings", readings)
  return readings


def _continue(path, backends, embedder, replay, progress, max_steps):
  store = Store(path)
  cfg = ml_collections.ConfigDict(store.get_meta("config"))
  questions = world_lib.load_questions(cfg.world.question_file, cfg.world.max_question_chars)
  agents = load_agents(store)
  calls = CallLog(store, backends, replay_path=replay)
  ctx = back_scatter.StepContext(
      agents=agents, questions=questions, prompts=prompts_lib.Prompts(cfg.prompts.to_dict()),
      calls=calls, embed=_cached_embedder(store, embedder, calls.replay), cfg=cfg)
  if not replay:
    announce_choice_readings(cfg, calls, store)
  steps = plan(cfg)
  done = store.completed_steps()
  pending = [s for s in steps if (s[0], s[1]) not in done]
  bar = None
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=len(steps), initial=len(steps) - len(pending), unit="step",
                    desc=f"sandbox {cfg.run_id}")
  try:
    for n, (r, s, ids) in enumerate(pending):
      if max_steps is not None and n >= max_steps:
        break
      t0 = time.perf_counter()
      before = collections.Counter(calls.counters) + collections.Counter(calls.backend_counters())
      ctx.counters.clear()
      episodes, writes = back_scatter.run_step(ctx, r, ids)
      after = collections.Counter(calls.counters) + collections.Counter(calls.backend_counters())
      counters = {**dict(after - before), **dict(ctx.counters), **_step_counters(episodes)}
      with store.transaction():
        for ep in episodes:
          store.add_episode(ep)
        for agent, q, ans, v in writes:
          store.add_memory(agent, len(agents[agent].memory), q, ans, v, r)
        store.mark_step(r, s, time.perf_counter() - t0, counters)
      for agent, q, ans, v in writes:  # only after the commit succeeded
        agents[agent].memory.add(q, ans, v)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(round=r, calls=calls.counters["calls_made"])
  finally:
    if bar is not None:
      bar.close()
    calls.close()
    store.close()


def run_and_export(cfg, out_path: str, *, replay: str | None = None, progress: bool = False,
                   backends: dict | None = None) -> int:
  """Runs the society of `cfg` to the end and writes the DESIGN.md JSONL export to `out_path`;
  returns the number of episodes. A store left by an interrupted call with the same config is
  resumed; one made from a different config is an error (a silent mix would corrupt the data)."""
  from stable_alignment_jax.sandbox import export
  path = store_path(cfg)
  if os.path.exists(path):
    store = Store(path)
    try:
      same = store.get_meta("config") == json.loads(cfg.to_json())
    finally:
      store.close()
    if not same:
      raise ValueError(f"{path}: run store exists with a different config; remove it or set "
                       "config.store / config.run_id")
    resume(path, replay=replay, progress=progress, backends=backends)
  else:
    start(cfg, replay=replay, progress=progress, backends=backends)
  return export.write_jsonl(path, out_path)
