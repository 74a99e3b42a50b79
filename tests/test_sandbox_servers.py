"""SANDBOX against the OpenAI-compatible servers people run, faked in process (sandbox_server.py):
choice readings only where the server verifiably continues the cue, a cue followed by a bare
space, an outage ridden out, a server that never answers ending in one `resume` line, and the
capability learned once per model."""

import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sandbox_server as srv  # noqa: E402
import subproc  # noqa: E402

from stable_alignment_jax.sandbox import export, prompts, runner  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("agent-large", "agent-small", "observer")  # society_config's three


@pytest.fixture
def pool(sandbox_pool):
  return sandbox_pool


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("SBX_KEY", "test-key-not-secret")


def _records(path):
  s = Store(path)
  try:
    return export.records(s), [c for _, _, _, c in s.step_rows()], s.get_meta("choice_readings")
  finally:
    s.close()


def _sources(recs) -> set:
  out = {f["rating_source"] for r in recs for f in r["feedback"] if f["rating"] is not None}
  for r in recs:
    for part in ("draft", "revised"):
      out |= {r[part][f + "_source"] for f in ("moral", "engagement")
              if r[part][f] is not None}
  return out


def test_server_ignoring_continue_final_message_gets_text_readings(tmp_path, pool, monkeypatch):
  """llama.cpp's behaviour: the final assistant message closed and a new reply opened. Without
  the check every rating came out a confident "1"; now the probe sees the extra prompt tokens,
  every number is read as text (exactly the text-mode run's), and it says so."""
  qf, pf = pool
  with srv.ServerThread(srv.make_app(continue_final="ignore")) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "i.sqlite"), qf, pf, rounds=1,
                             rating_mode="auto")
    err = io.StringIO()
    with monkeypatch.context() as m:
      m.setattr(sys, "stderr", err)
      runner.start(cfg, progress=False)
    stats = dict(server.stats)
  with srv.ServerThread(srv.make_app()) as server:
    ref = srv.society_config(server.url, str(tmp_path / "t.sqlite"), qf, pf, rounds=1)
    runner.start(ref, progress=False)
  recs, (counters,), readings = _records(cfg.store)
  assert recs == _records(ref.store)[0]
  assert _sources(recs) == {"text"}
  with open(tmp_path / "e.jsonl", "w") as f:
    export.write_jsonl(cfg.store, f.name)
  assert '"choice"' not in open(tmp_path / "e.jsonl").read()
  # Two probe requests per model, no logprobs request for any judgement.
  assert stats.get("logprobs", 0) == 0 and stats["probes"] == 2 * len(MODELS)
  n_judged = sum(len(r["feedback"]) for r in recs) + 2 * len(recs)
  assert counters["choice_fallback"] == n_judged and counters["choice_unverified"] > 0
  assert set(readings) == {f"srv/{m}" for m in MODELS}
  for r in readings.values():
    assert not r["verified"] and "ignores continue_final_message" in r["why"]
  assert err.getvalue().count("ratings read as text (not as choices)") == len(MODELS)
  # `status` shows the same lines.
  p = subprocess.run([sys.executable, "-m", "stable_alignment_jax.sandbox", "status",
                      f"--store={cfg.store}"], cwd=ROOT, env=subproc.jax_env(),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.count("ignores continue_final_message") == len(MODELS)


def test_cue_followed_by_a_bare_space(tmp_path, pool):
  """SmolLM2 after "Rating:": the top token is " ", no digit in sight. The reading goes on
  after the space and sums the two spellings: p(c) = p(" c") + p(" ") p(c | "Rating: ")."""
  qf, pf = pool
  with srv.ServerThread(srv.make_app(space_after_cue=True, malformed_rate=0.0)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "s.sqlite"), qf, pf, rounds=1,
                             rating_mode="auto")
    runner.start(cfg, progress=False)
  recs, (counters,), readings = _records(cfg.store)
  assert all(r["verified"] and r["how"] == "chat" for r in readings.values())
  s = Store(cfg.store)
  model_of = {a[0]: a[4] for a in s.agents()}
  s.close()
  pr = prompts.Prompts()
  n = 0
  for r in recs:
    for f in r["feedback"]:
      top = srv.next_token_logprobs(model_of[f["peer"]], pr.feedback(r["question"],
                                    r["draft"]["text"]), "Rating:", 20)
      lp = np.array([top[f" {v}"] for v in range(1, 8)])
      want = np.exp(lp) / np.exp(lp).sum()
      np.testing.assert_allclose(f["rating_probs"], want, rtol=1e-9)
      assert f["rating_source"] == "choice" and f["rating"] == np.argmax(want) + 1
      n += 1
  assert n and counters["choice_after_space"] > 0 and counters.get("choice_fallback", 0) == 0


def test_ten_second_outage_is_ridden_out(tmp_path, pool):
  """The server goes away (connections refused) for 10 s mid-run; the run retries under its
  time budget and completes with exactly the episodes of an undisturbed run."""
  qf, pf = pool
  with srv.ServerThread(srv.make_app()) as server:
    ref = srv.society_config(server.url, str(tmp_path / "ref.sqlite"), qf, pf)
    runner.start(ref, progress=False)
  app = srv.make_app()
  server = srv.ServerThread(app).__enter__()
  cfg = srv.society_config(server.url, str(tmp_path / "o.sqlite"), qf, pf)
  cfg.backends.srv.update(retry_budget_s=60.0, max_retries=-1, backoff_s=0.2, backoff_max_s=2.0)
  holder, t_down = [server], []

  def drop():
    while app.state.stats["requests"] < 40:
      time.sleep(0.01)
    t_down.append(time.monotonic())
    holder[0] = server.outage(10.0)
    t_down.append(time.monotonic())

  t = threading.Thread(target=drop, daemon=True)
  t.start()
  try:
    runner.start(cfg, progress=False)
  finally:
    t.join()
    holder[0].__exit__()
  assert t_down[1] - t_down[0] >= 10.0
  recs, steps, _ = _records(cfg.store)
  assert recs == _records(ref.store)[0] and len(recs) == 18
  assert sum(c.get("retry_connection", 0) for c in steps) > 0


def test_server_that_never_answers_ends_in_one_resume_line(tmp_path, pool):
  """After a first step, the server stops answering; `resume` retries for its budget, then
  prints one line (server, last error, the resume command), no traceback, and the finished
  step stays saved."""
  qf, pf = pool
  app = srv.make_app()
  with srv.ServerThread(app) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "h.sqlite"), qf, pf, timeout_s=0.3)
    cfg.backends.srv.update(retry_budget_s=2.0, max_retries=-1, backoff_s=0.1, backoff_max_s=0.5)
    runner.start(cfg, progress=False, max_steps=1)
    app.state.hang = True
    p = subprocess.run([sys.executable, "-m", "stable_alignment_jax.sandbox", "resume",
                        f"--store={cfg.store}", "--noprogress"], cwd=ROOT,
                       env=subproc.jax_env(SBX_KEY="k"), capture_output=True, text=True,
                       timeout=120)
    app.state.hang = False
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode != 0 and "Traceback" not in p.stderr
  assert len(lines) == 1, p.stderr
  assert server.url in lines[0] and "last error: timeout" in lines[0]
  assert f"python -m stable_alignment_jax.sandbox resume --store={cfg.store}" in lines[0]
  recs, steps, _ = _records(cfg.store)
  assert len(steps) == 1 and len(recs) == 9


def test_capability_is_learned_once_per_model(tmp_path, pool):
  """A server without logprobs: one probe request per model for the whole run, never one per
  judgement (every other request is a text call)."""
  qf, pf = pool
  with srv.ServerThread(srv.make_app(logprobs="none")) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "n.sqlite"), qf, pf, rating_mode="auto")
    runner.start(cfg, progress=False)
    stats = dict(server.stats)
  s = Store(cfg.store)
  text_calls = s.db.execute("SELECT COUNT(*) FROM calls WHERE params NOT LIKE '%choices%'"
                            ).fetchone()[0]
  s.close()
  recs, steps, readings = _records(cfg.store)
  assert stats["requests"] == text_calls + len(MODELS) and stats["probes"] == len(MODELS)
  assert all(r["why"] == "the server returns no logprobs" for r in readings.values())
  assert _sources(recs) == {"text"}


@pytest.mark.slow  # ~95 s on 2 busy cores: compiles of the served sampler's shapes dominate
def test_society_against_our_own_server_reads_verified_choices(tmp_path, project_pool):
  """serve.py over a tiny random model, SANDBOX pointed at it: the probe verifies the
  continuation (choices read over chat), and every number read as a choice equals the reading
  of independent next-token scores (a separate Sampler over the same weights) of the prompt the
  server lays out: the top-20 tokens' mass per digit, after a bare space too where it is
  likely, normalised over the seven."""
  from flax import nnx

  from stable_alignment_jax.sampling.generate import Sampler
  from stable_alignment_jax.model.llama import Llama
  from stable_alignment_jax.model.presets import preset
  from stable_alignment_jax.serve import create_app
  from stable_alignment_jax.serving.engine import Engine
  from stable_alignment_jax.sampling.text_sampler import TextSampler
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  qf, pf = project_pool  # short questions: byte-level prompts within the tiny context
  tok = load_tokenizer("byte")
  model = Llama(preset("tiny", vocab_size=tok.vocab_size, dtype="float32", max_seq_len=4096),
                rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  engine = Engine(TextSampler(graphdef, state, tok, min_batch=16), model_name="served",
                  max_batch=16, wait_ms=20)
  ref = Sampler(graphdef, state, eos_id=tok.eos_id, pad_id=tok.pad_id, min_batch=16)
  with srv.ServerThread(create_app(engine)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "own.sqlite"), qf, pf, n_agents=4,
                             rounds=1, rating_mode="auto", timeout_s=120.0)
    for g in cfg.agent_models.values():
      g.model = "served"
    cfg.observer.model = "served"
    for role in ("draft", "feedback", "revise", "observe"):
      cfg.sampling[role].max_tokens = 8
    runner.start(cfg, progress=False)
  recs, _, readings = _records(cfg.store)
  assert readings == {"srv/served": {**readings["srv/served"], "how": "chat", "verified": True}}

  def reading(text):
    vocab = list(range(tok.vocab_size))
    full = np.asarray(ref.next_token_logprobs([tok.encode(text, bos=True)], vocab))[0]
    top = np.argsort(-full, kind="stable")[:20]
    mass = lambda lp, ids, c: sum(np.exp(lp[t]) for t in ids if tok.decode([int(t)]).strip() == c)
    p = np.array([mass(full, top, str(c)) for c in range(1, 8)])
    spaces = [t for t in top if tok.decode([int(t)]) == " " and np.exp(full[t]) >= 0.01]
    if spaces:
      after = np.asarray(ref.next_token_logprobs([tok.encode(text + " ", bos=True)], vocab))[0]
      top2 = np.argsort(-after, kind="stable")[:20]
      p = p + np.exp(full[spaces[0]]) * np.array([mass(after, top2, str(c)) for c in range(1, 8)])
    return p / p.sum() if p.sum() else None

  pr = prompts.Prompts()
  checked = 0
  for r in recs:
    for f in r["feedback"]:
      if f["rating_source"] != "choice":
        continue
      text = engine.chat_prompt([{"role": "system", "content": pr.system},
                                 {"role": "user", "content": pr.feedback(r["question"],
                                                                         r["draft"]["text"])},
                                 {"role": "assistant", "content": "Rating:"}])
      np.testing.assert_allclose(f["rating_probs"], reading(text), atol=1e-5)
      checked += 1
  assert checked > 0


def test_unverified_chat_with_the_models_tokenizer_reads_through_completions(tmp_path, pool,
                                                                             smollm2_dir):
  """A server that ignores continue_final_message, and the backend given the model's tokenizer:
  choices are read through the completions API, the chat rendered by the model's own template
  (ChatML here) with the cue left open, so each reading is the server's scores after the cue."""
  from stable_alignment_jax.data.tokenizer import load_tokenizer, render_chat
  qf, pf = pool
  with srv.ServerThread(srv.make_app(continue_final="ignore", malformed_rate=0.0)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "tpl.sqlite"), qf, pf, rounds=1,
                             rating_mode="auto")
    cfg.backends.srv.tokenizer = str(smollm2_dir)
    runner.start(cfg, progress=False)
  recs, _, readings = _records(cfg.store)
  assert {r["how"] for r in readings.values()} == {"template"}
  s = Store(cfg.store)
  model_of = {a[0]: a[4] for a in s.agents()}
  s.close()
  tok, pr = load_tokenizer(str(smollm2_dir)), prompts.Prompts()
  n = 0
  for r in recs:
    for f in r["feedback"]:
      msgs = [{"role": "system", "content": pr.system}] if pr.system else []  # none: default
      msgs += [{"role": "user", "content": pr.feedback(r["question"], r["draft"]["text"])},
               {"role": "assistant", "content": "Rating:"}]
      text = render_chat(tok, msgs, add_generation_prompt=False, continue_final_message=True)
      assert text.endswith("<|im_start|>assistant\nRating:")
      top = srv.next_token_logprobs(model_of[f["peer"]], *srv.split_prefix(text), 20)
      lp = np.array([top[f" {v}"] for v in range(1, 8)])
      np.testing.assert_allclose(f["rating_probs"], np.exp(lp) / np.exp(lp).sum(), rtol=1e-9)
      assert f["rating_source"] == "choice"
      n += 1
  assert n > 0
