"""SANDBOX command line.

  python -m stable_alignment_jax.sandbox run --config=configs/sandbox.py:tiny
  python -m stable_alignment_jax.sandbox resume --store=runs/sandbox/sandbox_tiny.sqlite
  python -m stable_alignment_jax.sandbox status --store=...
  python -m stable_alignment_jax.sandbox export --store=... --out=episodes.jsonl
  python -m stable_alignment_jax.sandbox plot --store=... --out=rounds.png

`run --replay=OTHER.sqlite` takes every model call from another run's store (offline, exact).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("run", "resume", "status", "export", "plot")


def _store_path() -> str:
  from stable_alignment_jax.sandbox import runner
  if _STORE.value:
    return _STORE.value
  if _CONFIG.value is None:
    raise app.UsageError("give --store=PATH or --config=...")
  return runner.store_path(_CONFIG.value)


def _status(path: str) -> None:
  from stable_alignment_jax.sandbox import metrics, runner
  from stable_alignment_jax.sandbox.store import Store
  import ml_collections
  store = Store(path)
  try:
    cfg = ml_collections.ConfigDict(store.get_meta("config"))
    total = len(runner.plan(cfg))
    rows = store.step_rows()
    print(f"run {store.get_meta('run_id')}: {len(rows)}/{total} steps, "
          f"{store.count('episodes')} episodes, {store.count('calls')} logged calls")
    for reading in (store.get_meta("choice_readings") or {}).values():
      print(reading["line"])
    for row in metrics.per_round(store.episodes(), rows):
      print(json.dumps(row))
  finally:
    store.close()


def main(argv):
  from stable_alignment_jax.sandbox.backends.openai_backend import BackendUnavailable
  try:
    _main(argv)
  except BackendUnavailable as e:
    # A server outage longer than the retry budget: every finished step and every call that
    # returned is in the store; `resume` picks up from there.
    path = _store_path()
    sys.exit(f"sandbox: stopped: {e}. Everything done so far is saved in {path}; continue with: "
             f"python -m stable_alignment_jax.sandbox resume --store={path}")
  except (FileNotFoundError, FileExistsError, KeyError, ValueError, EnvironmentError) as e:
    # Bad input: one clear line, no traceback.
    sys.exit(f"sandbox: error: {e.args[0] if e.args else e}")


def _main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m stable_alignment_jax.sandbox {{{'|'.join(COMMANDS)}}} "
                         "[flags]")
  cmd = argv[1]
  from stable_alignment_jax.sandbox import runner
  if cmd == "run":
    if _CONFIG.value is None:
      raise app.UsageError("run needs --config=configs/sandbox.py[:arg]")
    cfg = _CONFIG.value
    if _STORE.value:
      cfg.store = _STORE.value
    path = runner.start(cfg, replay=_REPLAY.value, progress=_PROGRESS.value,
                        max_steps=_MAX_STEPS.value)
    _status(path)
  elif cmd == "resume":
    path = runner.resume(_store_path(), replay=_REPLAY.value, progress=_PROGRESS.value,
                         max_steps=_MAX_STEPS.value)
    _status(path)
  elif cmd == "status":
    _status(_store_path())
  elif cmd == "export":
    from stable_alignment_jax.sandbox import export
    if not _OUT.value:
      raise app.UsageError("export needs --out=FILE.jsonl")
    n = export.write_jsonl(_store_path(), _OUT.value)
    print(f"wrote {n} episodes to {_OUT.value}")
  elif cmd == "plot":
    from stable_alignment_jax.sandbox import metrics, plot
    from stable_alignment_jax.sandbox.store import Store
    if not _OUT.value:
      raise app.UsageError("plot needs --out=FILE.png")
    store = Store(_store_path())
    try:
      rows = metrics.per_round(store.episodes(), store.step_rows())
      plot.plot_rounds(rows, _OUT.value, title=f"SANDBOX {store.get_meta('run_id')}")
    finally:
      store.close()
    print(f"wrote {_OUT.value}")


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG, _MAX_STEPS, _OUT, _PROGRESS, _REPLAY, _STORE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sandbox.py[:arg]",
                                            lock_config=True)
  _STORE = flags.DEFINE_string("store", None, "run store (SQLite); default from the config")
  _REPLAY = flags.DEFINE_string("replay", None, "take all model calls from this run store")
  _OUT = flags.DEFINE_string("out", None, "output file for export (JSONL) or plot (PNG)")
  _PROGRESS = flags.DEFINE_bool("progress", True, "tqdm progress bar with ETA")
  _MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many steps (resumable)")
  app.run(main)


if __name__ == "__main__":
  cli()
