"""Kill-resume: a run in a subprocess is SIGKILLed at random points and resumed; the final
export equals an uninterrupted run with the same seed (0 lost, 0 duplicated episodes), and an
offline replay of the resumed run's call log reproduces it too."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sandbox_server as srv  # noqa: E402

from stable_alignment_jax.sandbox import export, runner  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS, STEP = 2, 1  # 9 agents, 1 central agent a step: 18 steps


def _progress(store: str) -> tuple[int, int]:
  """(completed steps, logged calls) of a store, read-only; (0, 0) before it exists."""
  if not os.path.exists(store):
    return 0, 0
  try:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
      return (db.execute("SELECT COUNT(*) FROM steps").fetchone()[0],
              db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    finally:
      db.close()
  except sqlite3.OperationalError:
    return 0, 0


def _kill_resume(tmp_path, pool, n_kills: int, seed: int):
  qf, pf = pool
  rng = np.random.default_rng(seed)
  env = {**os.environ, "SBX_KEY": "k", "JAX_PLATFORMS": "cpu"}
  total = ROUNDS * 9 // STEP
  # Random kill points: after `target` completed steps plus a random fraction of a step (or,
  # for target 0, possibly while the first process is still importing / creating the store).
  targets = sorted(int(t) for t in rng.choice(total - 2, size=n_kills, replace=False))
  with srv.ServerThread(srv.make_app(delay_s=0.01)) as server:
    ref_cfg = srv.society_config(server.url, str(tmp_path / "ref.sqlite"), qf, pf, rounds=ROUNDS,
                                 agents_per_step=STEP, concurrency=4)
    runner.start(ref_cfg, progress=False)
    store = str(tmp_path / "killed.sqlite")
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import sandbox_server\n"
        f"def get_config(arg=None):\n  return sandbox_server.society_config({server.url!r}, "
        f"{store!r}, {qf!r}, {pf!r}, rounds={ROUNDS}, agents_per_step={STEP}, concurrency=4)\n")
    cli = [sys.executable, "-m", "stable_alignment_jax.sandbox"]
    killed_at = []  # (completed steps, logged calls) right after each kill
    for target in targets + [None]:
      cmd = cli + (["resume", f"--store={store}"] if os.path.exists(store) else
                   ["run", f"--config={cfg_file}"]) + ["--noprogress"]
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
      if target is None:  # the last resume runs to the end
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        break
      deadline = time.time() + 60
      while _progress(store)[0] < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
      time.sleep(float(rng.uniform(0.0, 0.05)))
      assert proc.poll() is None, "the run ended before its kill point"
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      killed_at.append(_progress(store))
  ref = export.records(Store(ref_cfg.store))
  s = Store(store)
  got = export.records(s)
  n_steps, n_calls = s.count("steps"), s.count("calls")
  s.close()
  keys = [(r["round"], r["agent"]) for r in got]
  assert len(keys) == len(set(keys)) == ROUNDS * 9 and n_steps == total  # 0 lost, 0 duplicated
  assert got == ref
  # Every call made once and logged once, kills or not: the reference run's count.
  assert n_calls == sum(4 + len(r["feedback"]) for r in ref)
  # Offline replay of the killed-and-resumed run's call log gives the same export.
  cfg_r = srv.society_config("http://127.0.0.1:9/v1", str(tmp_path / "replay.sqlite"), qf, pf,
                             rounds=ROUNDS, agents_per_step=STEP)
  runner.start(cfg_r, progress=False, replay=store)
  assert export.records(Store(cfg_r.store)) == ref
  print(f"kill points (steps done, calls logged): {killed_at}")
  return killed_at


def test_kill_resume_five_random_points(tmp_path, monkeypatch, sandbox_pool):
  monkeypatch.setenv("SBX_KEY", "k")
  assert len(_kill_resume(tmp_path, sandbox_pool, n_kills=5, seed=1)) == 5
