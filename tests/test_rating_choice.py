"""rating_mode=choice: peer ratings and observer scores read as next-token choices over 1..7.

JAX backend: the scores equal an independent log-softmax of the model's next-token logits at
the seven digit ids. OpenAI-compatible backend: the server's logprobs (chat and completions),
and strict text where the server returns none or refuses them. The export records the source of
every number, old records (without sources) still read, and the data card counts by source."""

import dataclasses
import json
import math
import os
import sqlite3
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import sandbox_server as srv  # noqa: E402

from configs import sandbox as sandbox_config  # noqa: E402
from stable_alignment_jax.checkpoints import run_dir as checkpoints  # noqa: E402
from stable_alignment_jax.sandbox import export, judging, parsing, prompts, runner  # noqa: E402
from stable_alignment_jax.sandbox.backends import Request  # noqa: E402
from stable_alignment_jax.sandbox.backends.jax_backend import JaxBackend  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pool(sandbox_pool):
  return sandbox_pool


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv("SBX_KEY", "test-key-not-secret")


def test_distribution_is_the_softmax_over_the_seven():
  lp = [-3.0, -1.0, -0.5, -2.0, -math.inf, -4.0, -1.0]
  d = judging.distribution(lp)
  p = np.exp(np.array(lp)) / np.exp(np.array(lp)).sum()
  assert d["value"] == 3 and np.allclose(d["probs"], p) and d["probs"][4] == 0.0
  assert d["expected"] == pytest.approx(float(p @ np.arange(1, 8)))
  assert judging.distribution(None) is None and judging.distribution([-math.inf] * 7) is None


def _jax_config(store, qf, pf, mode="choice"):
  c = sandbox_config.get_config("tiny")
  c.store, c.rating_mode, c.rounds = store, mode, 1
  c.world.question_file, c.world.prior_file = qf, pf
  c.backends.local.max_prompt_tokens = 128
  for role in ("draft", "feedback", "revise", "observe"):
    c.sampling[role].max_tokens = 8
  return c


def test_jax_choice_equals_log_softmax_of_the_next_token_logits(tmp_path, pool):
  cfg = _jax_config(str(tmp_path / "c.sqlite"), *pool)
  backend = JaxBackend("local", cfg.backends.local, ["tiny-random"])
  graphdef, state = checkpoints.load_model("random:tiny:0", dtype="float32")
  model = nnx.merge(graphdef, state)
  reqs = [Request("local", "tiny-random", prompts.Prompts().feedback(q, a), 1, 0.0, 1.0, 0,
                  prefix=cue, choices=prompts.SCALE)
          for q, a, cue in (("Is lying ok?", "No.", "Rating:"), ("Why?", "Because.", "Moral:"),
                            ("Hi", "Hello there", "Moral: 4\nEngagement:"))]
  got = backend.choose_sync(reqs)
  for r, lp in zip(reqs, got):
    # Byte tokens: " 5" is two tokens, so the digit is scored after "Rating: " (space in cue).
    ids = [1] + [b + 3 for b in (r.prompt + r.prefix + " ").encode()]
    ids = ids[:1] + ids[-(cfg.backends.local.max_prompt_tokens - 1):]  # the end kept, BOS first
    logits, _ = model(np.asarray([ids], np.int32))
    digits = np.array([ord(c) + 3 for c in "1234567"])
    want = np.asarray(jax.nn.log_softmax(np.asarray(logits[0, -1], np.float32)))[digits]
    np.testing.assert_allclose(lp, want, atol=2e-4)


def test_jax_society_reads_every_number_as_a_choice(tmp_path, pool):
  cfg = _jax_config(str(tmp_path / "c.sqlite"), *pool)
  runner.start(cfg, progress=False)
  out = tmp_path / "c.jsonl"
  assert export.write_jsonl(cfg.store, str(out)) == 9
  recs = export.read_jsonl(str(out))  # validates sources and distributions
  s = Store(cfg.store)
  (counters,) = [c for _, _, _, c in s.step_rows()]
  calls = {json.loads(p).get("prefix", ""): t
           for p, t in s.db.execute("SELECT params, text FROM calls")}
  s.close()
  fbs = [f for r in recs for f in r["feedback"]]
  assert fbs and all(f["rating_source"] == "choice" for f in fbs)
  for f in fbs:  # the value is the argmax of the stored distribution, the mean its expectation
    assert f["rating"] == int(np.argmax(f["rating_probs"])) + 1
    assert f["rating_expected"] == pytest.approx(np.dot(f["rating_probs"], np.arange(1, 8)))
  for r in recs:
    for part in ("draft", "revised"):
      for k in ("moral", "engagement"):
        assert r[part][f"{k}_source"] == "choice" and r[part][k] is not None
        assert r[part][k] == np.argmax(r[part][f"{k}_probs"]) + 1
  assert counters["feedback_choice"] == len(fbs) and counters["feedback_unparsed"] == 0
  assert counters["observer_choice"] == counters["observer_total"] == 4 * len(recs)
  # The reason was written after the chosen rating: logged with the "Rating: N\nReason:" prefix.
  reasons = {p for p in calls if p.startswith("Rating: ")}
  assert reasons == {prompts.reason_prefix(f["rating"]) for f in fbs}
  # A random model never writes the text format: in text mode every number is null.
  cfg_t = _jax_config(str(tmp_path / "t.sqlite"), *pool, mode="text")
  runner.start(cfg_t, progress=False)
  s = Store(cfg_t.store)
  recs_t = export.records(s)
  s.close()
  assert all(f["rating"] is None and f["rating_source"] == "text"
             for r in recs_t for f in r["feedback"])


def _server_choice(model, prompt, prefix):
  top = srv.next_token_logprobs(model, prompt, prefix, 20)
  lp = np.array([top.get(f" {v}", -np.inf) for v in range(1, 8)])
  p = np.exp(lp - lp.max())
  return p / p.sum()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_openai_choice_from_server_logprobs(tmp_path, pool, api):
  qf, pf = pool
  with srv.ServerThread(srv.make_app(malformed_rate=0.3)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "o.sqlite"), qf, pf, rounds=1,
                             rating_mode="choice", api=api)
    runner.start(cfg, progress=False)
    stats = dict(server.stats)
  s = Store(cfg.store)
  recs = export.records(s)
  model_of = {a[0]: a[4] for a in s.agents()}
  s.close()
  # One logprobs call per (peer model, draft) -- peers of one model score a draft identically,
  # so the call log asks once -- and two per observer score; all answered with scores.
  rated = {(model_of[f["peer"]], r["agent"]) for r in recs for f in r["feedback"]}
  assert stats["logprobs"] == len(rated) + 2 * 2 * len(recs)
  pr = prompts.Prompts()
  for r in recs:
    for f in r["feedback"]:
      want = _server_choice(model_of[f["peer"]], pr.feedback(r["question"], r["draft"]["text"]),
                            prompts.RATING_CUE)
      np.testing.assert_allclose(f["rating_probs"], want, rtol=1e-9)
      assert f["rating"] == np.argmax(want) + 1 and f["rating_source"] == "choice"
      assert f["reason"].strip()  # written after "Rating: N\nReason:" by the server
    for part in ("draft", "revised"):
      prompt = pr.observe(r["question"], r[part]["text"])
      want = _server_choice("observer", prompt, prompts.MORAL_CUE)
      np.testing.assert_allclose(r[part]["moral_probs"], want, rtol=1e-9)
      assert r[part]["moral"] == np.argmax(want) + 1
      want_e = _server_choice("observer", prompt,
                              prompts.engagement_prefix(int(r[part]["moral"])))
      np.testing.assert_allclose(r[part]["engagement_probs"], want_e, rtol=1e-9)


@pytest.mark.parametrize("logprobs", ["none", "refuse"])
def test_openai_without_logprobs_falls_back_to_strict_text(tmp_path, pool, logprobs):
  qf, pf = pool
  with srv.ServerThread(srv.make_app(malformed_rate=0.3, logprobs=logprobs)) as server:
    cfg = srv.society_config(server.url, str(tmp_path / "f.sqlite"), qf, pf, rounds=1,
                             rating_mode="auto")
    runner.start(cfg, progress=False)
  with srv.ServerThread(srv.make_app(malformed_rate=0.3)) as server:
    ref_cfg = srv.society_config(server.url, str(tmp_path / "t.sqlite"), qf, pf, rounds=1)
    runner.start(ref_cfg, progress=False)
  s = Store(cfg.store)
  recs, (counters,) = export.records(s), [c for _, _, _, c in s.step_rows()]
  texts = {(p, seed): t for p, seed, t, params in s.db.execute(
      "SELECT prompt, seed, text, params FROM calls") if "choices" not in json.loads(params)}
  s.close()
  s = Store(ref_cfg.store)
  ref = export.records(s)
  s.close()
  # Every judgement fell back to text and is exactly the text-mode run's reading.
  assert recs == ref
  assert all(f["rating_source"] == "text" for r in recs for f in r["feedback"])
  n_fb = sum(len(r["feedback"]) for r in recs)
  assert counters["choice_fallback"] == n_fb + 2 * len(recs)
  nulls = sum(f["rating"] is None for r in recs for f in r["feedback"])
  assert 0 < nulls < n_fb  # the strict parser still stores null for malformed replies
  assert nulls == sum(parsing.parse_feedback(t)[0] is None for (p, _), t in texts.items()
                      if p.startswith("Another member") and "Rating: <an" in p)


def test_old_store_and_old_records_still_read(tmp_path, pool):
  """A schema-1 store (no `details`) migrates on open and exports without source fields;
  such records validate, beside new ones."""
  path = str(tmp_path / "old.sqlite")
  s = Store(path, create=True)
  ep = {"round": 0, "agent": 0, "agent_model": "m", "question": "q?", "accepted": "revised",
        "draft": {"text": "d", "moral": 5.0, "engagement": None},
        "revised": {"text": "r", "moral": 6.0, "engagement": 4.0},
        "feedback": [{"peer": 1, "rating": 3, "reason": "ok"}]}
  with s.transaction():
    s.add_episode(ep)
  s.close()
  db = sqlite3.connect(path)
  for table in ("episodes", "feedback"):
    db.execute(f"ALTER TABLE {table} DROP COLUMN details")
  db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
  db.commit()
  db.close()
  s = Store(path)
  (old,) = s.episodes()
  assert s.get_meta("schema_version") == 2
  s.close()
  assert old["feedback"] == [{"peer": 1, "rating": 3, "reason": "ok"}]
  assert old["draft"] == {"text": "d", "moral": 5.0, "engagement": None}
  export.validate_record({"run_id": "x", **{k: old[k] for k in export.TOP_KEYS[1:]}})
  bad = {"run_id": "x", **{k: old[k] for k in export.TOP_KEYS[1:]}}
  bad["feedback"] = [{"peer": 1, "rating": 3, "rating_source": "choice",
                      "rating_probs": [0.5] * 7, "reason": "ok"}]
  with pytest.raises(ValueError, match=r"feedback\[0\].rating_probs: expected 7 probabilities"):
    export.validate_record(bad)


@pytest.mark.slow  # ~1 min on a shared CPU: a 135M model in JAX and in torch
def test_smollm2_backend_uses_its_chat_template_and_scores_like_transformers(tmp_path, pool,
                                                                             smollm2_dir):
  """The real SmolLM2: prompts rendered as transformers renders its ChatML template (the cue as
  the start of the assistant's reply), the digit scored where the tokenizer writes it (SmolLM2
  splits digits off: "Rating: 5" is ..., ":", "Ġ", "5"; so "5" after "Rating: "), and the scores
  equal torch's log-softmax of the same model's next-token logits."""
  import torch
  import transformers
  cfg = _jax_config(str(tmp_path / "s.sqlite"), *pool)
  cfg.backends.local.model, cfg.backends.local.max_prompt_tokens = str(smollm2_dir), 1024
  backend = JaxBackend("local", cfg.backends.local, ["tiny-random"])
  (m,) = backend.models.values()
  hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  r = Request("local", "tiny-random", prompts.Prompts().feedback("Is it ok to lie?", "Never."),
              1, 0.0, 1.0, 0, prefix=prompts.RATING_CUE, choices=prompts.SCALE)
  user = [{"role": "user", "content": r.prompt}]
  assert m.chat and m.text(m.prompt(dataclasses.replace(r, prefix=""))) == \
      hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
  prompt, written = m.choice_prompt(r)
  assert hf_tok.tokenize("Rating: 5")[-2:] == ["Ġ", "5"]
  text = hf_tok.apply_chat_template(user + [{"role": "assistant", "content": "Rating: "}],
                                    continue_final_message=True, tokenize=False)
  assert m.text(prompt) == text and text.endswith("<|im_start|>assistant\nRating: ")
  assert written == list(prompts.SCALE)
  (got,) = backend.choose_sync([r])
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
  ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = model(ids).logits[0, -1]
  want = torch.log_softmax(logits, -1)[hf_tok.convert_tokens_to_ids(list(prompts.SCALE))].numpy()
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_server_tokens_match_choices_by_their_text():
  from stable_alignment_jax.sandbox.backends.openai_backend import choice_logprobs
  top = {" 5": math.log(0.5), "5": math.log(0.2), " 3": math.log(0.1), " I": math.log(0.15)}
  got = choice_logprobs(top, prompts.SCALE)
  assert got[4] == pytest.approx(math.log(0.7)) and got[2] == pytest.approx(math.log(0.1))
  assert [i for i, x in enumerate(got) if x == -math.inf] == [0, 1, 3, 5, 6]
  assert choice_logprobs({" I": -0.1, "\n": -3.0}, prompts.SCALE) is None
