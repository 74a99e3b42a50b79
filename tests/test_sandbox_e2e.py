"""A society of 9 agents against a real HTTP server on 127.0.0.1: end to end, export contract,
record/replay, faults (429/500/timeouts, malformed ratings) and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sandbox_server as srv  # noqa: E402

from stable_alignment_jax.sandbox import export, metrics, parsing, prompts, runner, world  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pool(both_pools):
  """(question_file, prior_file): the project-written pool, and the real one where present."""
  return both_pools


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("SBX_KEY", "test-key-not-secret")


def _run(cfg, **kw):
  runner.start(cfg, progress=False, **kw)
  s = Store(cfg.store)
  try:
    return export.records(s), s.step_rows(), s.count("calls")
  finally:
    s.close()


def _independent_unparsed(recs):
  """Re-derives every null from the logged raw replies with plain string handling."""
  return sum(f["rating"] is None for r in recs for f in r["feedback"])


def test_society_end_to_end_and_replay(tmp_path, pool):
  qf, pf = pool
  with srv.ServerThread(srv.make_app(malformed_rate=0.15)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "a.sqlite"), qf, pf)
    recs, steps, n_calls = _run(cfg)
    ok_calls = server.stats["ok"]
  # Export contract, field by field, through the validator and the written JSONL.
  out = tmp_path / "a.jsonl"
  assert export.write_jsonl(cfg.store, str(out)) == 18
  back = export.read_jsonl(str(out))
  assert back == recs
  assert [(r["round"], r["agent"]) for r in recs] == [(r, a) for r in range(2) for a in range(9)]
  assert {r["agent_model"] for r in recs} == {"srv/agent-small", "srv/agent-large"}
  questions = open(qf).read().split("\n")
  assert all(r["question"] in questions for r in recs)
  assert all(r["run_id"] == "sandbox_tiny" for r in recs)
  # Every call went over HTTP once: 1 draft + peers + 2 observer + 1 revision per episode.
  want_calls = sum(4 + len(r["feedback"]) for r in recs)
  assert n_calls == want_calls == ok_calls
  # Nulls are exactly the replies the strict format rejects, re-read from the call log.
  s = Store(cfg.store)
  raw = {(p, seed): t for p, seed, t in s.db.execute("SELECT prompt, seed, text FROM calls")}
  s.close()
  pr = prompts.Prompts()
  for r in recs:
    for slot, f in enumerate(r["feedback"]):
      seed = world.call_seed(cfg.seed, r["round"], r["agent"], "feedback", slot)
      text = raw[pr.feedback(r["question"], r["draft"]["text"]), seed]
      lines = text.strip().split("\n")
      ok = (len(lines) >= 2 and lines[0].startswith("Rating: ") and lines[0][8:].isdigit()
            and 1 <= int(lines[0][8:]) <= 7 and lines[1].startswith("Reason: "))
      assert (f["rating"] is not None) == ok, text
      if ok:
        assert f["rating"] == int(lines[0][8:])
    for slot, part in enumerate(("draft", "revised")):
      seed = world.call_seed(cfg.seed, r["round"], r["agent"], "observe", slot)
      obs = raw[pr.observe(r["question"], r[part]["text"]), seed]
      assert (r[part]["moral"], r[part]["engagement"]) == tuple(
          None if v is None else float(v) for v in parsing.parse_observer(obs))
  rows = metrics.per_round([{k: v for k, v in r.items() if k != "run_id"} for r in recs], steps)
  ratings = [f["rating"] for r in recs for f in r["feedback"]]
  unparsed = _independent_unparsed(recs)
  assert 0 < unparsed < len(ratings)  # malformed_rate=0.15 produced some, not all
  assert sum(x["unparsed_rating_rate"] * sum(len(r["feedback"]) for r in recs
                                             if r["round"] == x["round"]) for x in rows) == \
      pytest.approx(unparsed)
  assert rows[0]["revised_moral"] == pytest.approx(np.mean(
      [r["revised"]["moral"] for r in recs if r["round"] == 0 and r["revised"]["moral"]]))
  # Offline replay (no server, no backends) reproduces the export exactly.
  cfg_b = srv.society_config("http://127.0.0.1:9/v1", str(tmp_path / "b.sqlite"), qf, pf)
  recs_b, _, _ = _run(cfg_b, replay=cfg.store)
  assert recs_b == recs
  # A different seed is a different run (the test above is not vacuous).
  cfg_c = srv.society_config("http://127.0.0.1:9/v1", str(tmp_path / "c.sqlite"), qf, pf, seed=1)
  with pytest.raises(KeyError, match="replay: .* not in"):
    runner.start(cfg_c, progress=False, replay=cfg.store)


def test_faults_are_retried_and_counted(tmp_path, pool):
  qf, pf = pool
  with srv.ServerThread(srv.make_app(malformed_rate=0.15)) as server:
    clean, _, _ = _run(srv.society_config(server.url, str(tmp_path / "clean.sqlite"), qf, pf))
  app = srv.make_app(fault_rate=0.2, malformed_rate=0.15, slow_s=1.0, fault_seed=3)
  with srv.ServerThread(app) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "faulty.sqlite"), qf, pf, timeout_s=0.4)
    recs, steps, _ = _run(cfg)
    stats = dict(server.stats)
  # Content does not depend on faults: the run completes with the clean run's episodes.
  assert recs == clean
  retries = {}
  for _, _, _, c in steps:
    for k, v in c.items():
      if k.startswith("retry_"):
        retries[k] = retries.get(k, 0) + v
  assert stats["fault_429"] > 0 and stats["fault_500"] > 0 and stats["fault_slow"] > 0
  assert retries == {"retry_429": stats["fault_429"], "retry_5xx": stats["fault_500"],
                     "retry_timeout": stats["fault_slow"]}
  total = sum(sum(len(r["feedback"]) for r in recs) for _ in [0])
  unparsed = sum(c["feedback_unparsed"] for _, _, _, c in steps)
  assert unparsed == _independent_unparsed(recs) and 0 < unparsed < total
  print(f"faults: {stats}; retries {retries}; unparsed ratings {unparsed}/{total}")


def test_bad_input_fails_before_the_run_starts(tmp_path, pool, monkeypatch):
  qf, pf = pool
  store = tmp_path / "x.sqlite"
  bad_q = tmp_path / "q.txt"
  bad_q.write_text("Is it fine?\n   \n" + "why " * 1000 + "\n")
  cfg = srv.society_config("http://127.0.0.1:9/v1", str(store), str(bad_q), pf)
  with pytest.raises(ValueError, match=r"q.txt: bad question lines: line 2: blank; line 3: 4000 "
                     r"characters"):
    runner.start(cfg, progress=False)
  cfg = srv.society_config("http://127.0.0.1:9/v1", str(store), qf, pf)
  cfg.backends.srv.kind = "anthropic"
  with pytest.raises(KeyError, match=r"config.backends.srv.kind='anthropic': unknown backend; "
                     r"known: \['jax', 'openai'\]"):
    runner.start(cfg, progress=False)
  cfg = srv.society_config("http://127.0.0.1:9/v1", str(store), qf, pf)
  cfg.observer.backend = "nowhere"
  with pytest.raises(KeyError, match="config names backend 'nowhere'"):
    runner.start(cfg, progress=False)
  monkeypatch.delenv("SBX_KEY")
  cfg = srv.society_config("http://127.0.0.1:9/v1", str(store), qf, pf)
  with pytest.raises(EnvironmentError, match="environment variable SBX_KEY is not set"):
    runner.start(cfg, progress=False)
  assert not os.path.exists(store)  # nothing was started


def test_cli_run_status_export_plot(tmp_path, pool):
  qf, pf = pool
  env = {**os.environ, "SBX_KEY": "k", "JAX_PLATFORMS": "cpu"}
  with srv.ServerThread(srv.make_app()) as server:
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import sandbox_server\n"
        f"def get_config(arg=None):\n  return sandbox_server.society_config({server.url!r}, "
        f"{str(tmp_path / 'cli.sqlite')!r}, {qf!r}, {pf!r})\n")
    cli = [sys.executable, "-m", "stable_alignment_jax.sandbox"]
    p = subprocess.run(cli + ["run", f"--config={cfg_file}", "--noprogress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2/2 steps, 18 episodes" in p.stdout
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert [r["round"] for r in rows] == [0, 1]
    store = str(tmp_path / "cli.sqlite")
    p = subprocess.run(cli + ["export", f"--store={store}", f"--out={tmp_path / 'e.jsonl'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "wrote 18 episodes" in p.stdout, p.stderr
    assert len(export.read_jsonl(str(tmp_path / "e.jsonl"))) == 18
    p = subprocess.run(cli + ["plot", f"--store={store}", f"--out={tmp_path / 'r.png'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # A second `run` on the same store refuses; a missing key is reported by name.
    p = subprocess.run(cli + ["run", f"--config={cfg_file}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "run store exists; use `resume`" in p.stderr
    env.pop("SBX_KEY")
    p = subprocess.run(cli + ["resume", f"--store={store}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "environment variable SBX_KEY is not set" in p.stderr
    assert "test-key" not in p.stderr


def test_run_and_export_resumes_and_refuses_another_config(tmp_path, pool):
  qf, pf = pool
  with srv.ServerThread(srv.make_app()) as server:
    ref = srv.society_config(server.url, str(tmp_path / "ref.sqlite"), qf, pf)
    assert runner.run_and_export(ref, str(tmp_path / "ref.jsonl")) == 18
    cfg = srv.society_config(server.url, str(tmp_path / "cut.sqlite"), qf, pf)
    runner.start(cfg, progress=False, max_steps=1)  # interrupted after round 0
    s = Store(cfg.store)
    assert s.count("episodes") == 9
    s.close()
    assert runner.run_and_export(cfg, str(tmp_path / "cut.jsonl")) == 18
  assert export.read_jsonl(str(tmp_path / "cut.jsonl")) == \
      export.read_jsonl(str(tmp_path / "ref.jsonl"))
  cfg.seed = 1
  with pytest.raises(ValueError, match="cut.sqlite: run store exists with a different config"):
    runner.run_and_export(cfg, str(tmp_path / "x.jsonl"))
