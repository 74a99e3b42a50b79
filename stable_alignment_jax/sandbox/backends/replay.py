"""Record/replay: every model call is keyed (backend, model, prompt, sampling params, seed) and
logged in the run store as soon as its phase returns.

- record (default): a call already in this run's log (e.g. made before a kill) is not sent
  again; new calls go to their backend and into the log.
- choice calls (`choose`) are logged the same way; their text is the JSON list of the choices'
  log-probabilities, or `null` where the backend could not score them.
- replay: calls come from another run's store only; a call missing there is an error, so an
  offline replay is exact or fails loudly. The replayed calls are copied into this run's log.
"""

import asyncio
import collections
import json

from stable_alignment_jax.sandbox.store import Store


def _logged_params(r) -> dict:
  """The sampling params, plus the system/prefix/choices of the call where it has them, so the
  log shows what the model was asked."""
  extra = {k: v for k, v in (("system", r.system), ("prefix", r.prefix),
                              ("choices", list(r.choices))) if v}
  return {**r.params(), **extra}


class CallLog:

  def __init__(self, store: Store, backends: dict, *, replay_path: str | None = None):
    self.store, self.backends = store, backends
    self.replay = Store(replay_path) if replay_path else None
    self.replay_path = replay_path
    self.counters = collections.Counter()
    self.loop = asyncio.new_event_loop()  # one loop for the run: HTTP pools live across steps

  def complete(self, reqs: list) -> list[str]:
    return self._calls(reqs, "complete")

  def choose(self, reqs: list) -> list[list[float] | None]:
    """Log-probabilities of each request's `choices` (None where its backend could not score
    them), logged as JSON text beside the completions."""
    return [json.loads(t) for t in self._calls(reqs, "choose")]

  def _calls(self, reqs: list, method: str) -> list[str]:
    keys = [r.key for r in reqs]
    unique = list(dict.fromkeys(keys))
    source = self.replay or self.store
    found = source.lookup_calls(unique)
    by_key = {r.key: r for r in reqs}
    missing = [k for k in unique if k not in found]
    if self.replay is not None and missing:
      r = by_key[missing[0]]
      raise KeyError(f"replay: {len(missing)} call(s) not in {self.replay_path}; first: backend "
                     f"{r.backend!r} model {r.model!r} seed {r.seed} prompt {r.prompt[:80]!r}")
    self.counters["calls_replayed" if self.replay else "calls_cached"] += len(unique) - len(missing)
    if missing:
      groups: dict[str, list] = {}
      for k in missing:
        groups.setdefault(by_key[k].backend, []).append(by_key[k])
      names = list(groups)
      for name in names:
        if name not in self.backends:
          raise KeyError(f"no backend named {name!r}; configured: {sorted(self.backends)}")
        if not hasattr(self.backends[name], method):
          raise TypeError(f"backend {name!r} cannot {method} (rating_mode=choice needs a backend "
                          "that scores choices)")

      async def run_all():
        return await asyncio.gather(*(getattr(self.backends[n], method)(groups[n])
                                      for n in names), return_exceptions=True)

      results = self.loop.run_until_complete(run_all())
      error = None
      for name, outs in zip(names, results):
        if isinstance(outs, BaseException):
          # A server that stayed down: the calls that did complete are logged below before
          # the error propagates, so a resume does not pay for them again.
          error = error or outs
          outs = getattr(outs, "partial", {})
        else:
          outs = dict(enumerate(outs))
        for i, out in outs.items():
          r = groups[name][i]
          found[r.key] = out if method == "complete" else json.dumps(out)
      missing = [k for k in missing if k in found]
      self.counters["calls_made"] += len(missing)
      if error is not None:
        self._log(by_key, missing, found)
        raise error
    self._log(by_key, unique if self.replay else missing, found)
    return [found[k] for k in keys]

  def _log(self, by_key: dict, keys: list[str], found: dict) -> None:
    new_rows = [(k, by_key[k].backend, by_key[k].model, by_key[k].prompt,
                 json.dumps(_logged_params(by_key[k]), sort_keys=True), by_key[k].seed, found[k])
                for k in keys]
    if new_rows:
      with self.store.transaction():
        self.store.add_calls(new_rows)

  def choice_readings(self, models: dict[str, list[str]]) -> dict[str, dict]:
    """{"backend/model": reading} for the backends that probe how they read choices (learned
    once per backend and model; one line each is logged by the caller)."""
    out = {}
    for name, names in models.items():
      b = self.backends.get(name)
      if b is None or not hasattr(b, "probe"):
        continue
      for m, reading in self.loop.run_until_complete(b.probe(sorted(names))).items():
        out[f"{name}/{m}"] = {**reading.as_dict(), "line": reading.line(name, m)}
    return out

  def backend_counters(self) -> dict:
    total = collections.Counter()
    for b in self.backends.values():
      total.update(getattr(b, "counters", {}))
    return dict(total)

  def close(self):
    for b in self.backends.values():
      close = getattr(b, "aclose", None)
      if close is not None:
        self.loop.run_until_complete(close())
    self.loop.close()
    if self.replay is not None:
      self.replay.close()
