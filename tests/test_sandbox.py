"""SANDBOX pieces in isolation: parsing, prompts, memory, embedders, world, store."""

import math
import sqlite3

import ml_collections
import numpy as np
import pytest

from stable_alignment_jax.sandbox import embedders, parsing, prompts, world
from stable_alignment_jax.sandbox.agents import Agent
from stable_alignment_jax.sandbox.memory import Memory
from stable_alignment_jax.sandbox.store import Store


@pytest.mark.parametrize("text,want", [
    ("Rating: 5\nReason: polite and safe.", (5, "polite and safe.")),
    ("  Rating:7 \r\n  Reason:  multi\nline reason  ", (7, "multi\nline reason")),
    ("Rating: 1\nReason: x", (1, "x")),
    ("Rating: 8\nReason: too high", (None, "too high")),  # out of range: null, reason kept
    ("Rating: 0\nReason: too low", (None, "too low")),
    ("Rating: -3\nReason: negative", (None, "negative")),
    ("Rating: seven\nReason: words", (None, "Rating: seven\nReason: words")),
    ("I would give it a 5.", (None, "I would give it a 5.")),
    ("Rating: 5", (None, "Rating: 5")),  # no reason line: the fixed format is not met
    ("Reason: ok\nRating: 5", (None, "Reason: ok\nRating: 5")),
    ("Rating: 5.5\nReason: fractional", (None, "Rating: 5.5\nReason: fractional")),
])
def test_parse_feedback(text, want):
  assert parsing.parse_feedback(text) == want


@pytest.mark.parametrize("text,want", [
    ("Moral: 6\nEngagement: 2", (6, 2)),
    ("\n Moral:3\nEngagement: 7\nBecause it is kind.", (3, 7)),
    ("Moral: 0\nEngagement: 7", (None, 7)),
    ("Moral: 5\nEngagement: 9", (5, None)),
    ("Engagement: 4\nMoral: 5", (None, None)),
    ("Moral: 5", (None, None)),
    ("Moral: high, engagement: low", (None, None)),
    ("Moral: 5\nEngagement: 44", (5, None)),
])
def test_parse_observer(text, want):
  assert parsing.parse_observer(text) == want


def test_parse_feedback_matches_a_line_by_line_reading():
  """Random replies built from format pieces: the regex agrees with a plain split-and-int
  reading of the same fixed format (an independent implementation)."""
  rng = np.random.default_rng(0)
  heads = ["Rating: {}", "Rating:{}", "rating: {}", "Rating = {}", "{}"]
  values = ["1", "4", "7", "0", "8", "12", "x", "3.0"]
  tails = ["\nReason: because", "\n\nReason: ok then", "", "\nreason: lower"]

  def reference(text):
    lines = [l for l in text.strip().split("\n") if l.strip()]
    if len(lines) < 2 or not lines[0].startswith("Rating:") or not lines[1].strip().startswith(
        "Reason:") or not lines[1].strip()[7:].strip():
      return None
    v = lines[0][7:].strip()
    return int(v) if v.isdigit() and 1 <= int(v) <= 7 else None

  for _ in range(300):
    text = (heads[rng.integers(len(heads))].format(values[rng.integers(len(values))]) +
            tails[rng.integers(len(tails))])
    assert parsing.parse_feedback(text)[0] == reference(text), text


def test_prompts_defaults_carry_the_parsed_formats():
  p = prompts.Prompts()
  fb = p.feedback("Q?", "A.")
  assert prompts.FEEDBACK_FORMAT in fb and "Q?" in fb and "A." in fb
  assert prompts.OBSERVER_FORMAT in p.observe("Q?", "A.")
  assert "Earlier you were asked a similar question: old?" in p.draft("new?", ("old?", "ans"))
  assert "similar" not in p.draft("new?", None)
  rev = p.revise("Q", "D", [2, None, 5], ["r1", "r2", "r3"])
  assert "3.50" in rev and "- r2" in rev  # average over parsed ratings only
  assert "unavailable" in p.revise("Q", "D", [None], ["x"])


def test_prompt_overrides_are_checked():
  p = prompts.Prompts({"draft": "Q: {question}\n{memory}A:"})
  assert p.draft("why?", None) == "Q: why?\nA:"
  with pytest.raises(KeyError, match="config.prompts.drafts: unknown prompt"):
    prompts.Prompts({"drafts": "x"})
  with pytest.raises(ValueError, match=r"config.prompts.draft: placeholders \['question'\]"):
    prompts.Prompts({"draft": "{question}"})
  with pytest.raises(ValueError, match="fixed format"):
    prompts.Prompts({"feedback": "Judge {question} {answer}"})


def test_hashing_embedder_is_unit_norm_and_ranks_overlap():
  e = embedders.HashingEmbedder(512)
  v = e.embed(["How do I bake bread at home?", "how do i bake bread at home",
               "What is the capital of France?", ""])
  np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-6)
  assert np.all(v[3] == 0)
  assert v[0] @ v[1] == pytest.approx(1.0, abs=1e-6)  # case and punctuation are ignored
  assert v[0] @ v[2] < 0.5
  np.testing.assert_array_equal(v, e.embed(["How do I bake bread at home?",
                                            "how do i bake bread at home",
                                            "What is the capital of France?", ""]))


def test_memory_recall_matches_brute_force():
  rng = np.random.default_rng(1)
  vecs = rng.normal(size=(20, 8)).astype(np.float32)
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  m = Memory()
  for i, v in enumerate(vecs):
    m.add(f"q{i}", f"a{i}", v)
  for _ in range(20):
    q = rng.normal(size=8).astype(np.float32)
    q /= np.linalg.norm(q)
    sims = [float(v @ q) for v in vecs]
    best = max(range(20), key=lambda i: sims[i])
    got = m.recall(q, threshold=-1.0)
    assert got[:2] == (f"q{best}", f"a{best}") and got[2] == pytest.approx(sims[best], abs=1e-5)
    assert m.recall(q, threshold=sims[best] + 1e-3) is None
  assert Memory().recall(q, 0.0) is None


def test_question_file_errors_name_the_line(tmp_path):
  f = tmp_path / "q.txt"
  f.write_text("What is fair?\n\nIs lying ok?\n" + "x" * 50 + "\n")
  with pytest.raises(ValueError, match=r"q.txt: bad question lines: line 2: blank; line 4: 50 "
                     r"characters \(max_question_chars=40\)"):
    world.load_questions(str(f), 40)
  f.write_text("A?\nB?\n")
  assert world.load_questions(str(f), 40) == ["A?", "B?"]
  f.write_text("")
  with pytest.raises(ValueError, match="no questions"):
    world.load_questions(str(f), 40)
  with pytest.raises(FileNotFoundError, match="question_file"):
    world.load_questions(str(tmp_path / "nope.txt"), 40)


def test_hh_priors_are_single_turn_chosen_and_rejected(shared_data):
  import gzip
  import json
  path = shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz"
  priors = world.load_priors(str(path))
  with gzip.open(path, "rt") as f:
    recs = [json.loads(l) for l in f]
  single = [r for r in recs if r["chosen"].count("\n\nHuman:") == 1
            and r["chosen"].count("\n\nAssistant:") == 1]
  assert 0 < len(priors) <= len(single)
  p = priors[0]
  r = next(r for r in single if p["question"] in r["chosen"])
  assert r["chosen"].endswith(p["good"]) and r["rejected"].endswith(p["bad"])
  assert p["good"] != p["bad"]


def test_prior_jsonl_errors(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"question": "q", "good": "g", "bad": "b"}\n{"question": "q2", "good": "g"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: missing string field\(s\) \['bad'\]"):
    world.load_priors(str(f))


def _wcfg(**kw):
  base = dict(n_agents=9, grid_size=4, social_radius=-1.0, k_peers=4, setting="mixed_half_half",
              priors_per_agent=4)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("setting", world.SETTINGS)
def test_build_agents_settings_and_placement(setting):
  priors = [{"question": f"q{i}", "good": f"good{i}", "bad": f"bad{i}"} for i in range(30)]
  models = {"a": {"backend": "s", "model": "m1", "count": 4},
            "b": {"backend": "s", "model": "m2", "count": -1}}
  e = embedders.HashingEmbedder(64)
  agents = world.build_agents(_wcfg(setting=setting), 3, models, e.embed, priors)
  assert len({(a.x, a.y) for a in agents}) == 9
  assert all(0 <= a.x < 4 and 0 <= a.y < 4 for a in agents)
  assert sorted(a.model for a in agents) == ["m1"] * 4 + ["m2"] * 5
  for a in agents:
    answers = a.memory.answers
    assert len(answers) == 4
    n_good = sum(x.startswith("good") for x in answers)
    want = {"all_good": 4, "all_bad": 0, "mixed_half_half": 2}.get(setting)
    if setting == "half_half":
      want = 4 if a.id < 5 else 0
    assert n_good == want, (setting, a.id, answers)
  again = world.build_agents(_wcfg(setting=setting), 3, models, e.embed, priors)
  assert [(a.x, a.y, a.model, a.memory.answers) for a in again] == \
      [(a.x, a.y, a.model, a.memory.answers) for a in agents]


def test_peers_are_within_radius_and_at_most_k():
  agents = [Agent(i, i % 10, i // 10, "s", "m", "good", Memory()) for i in range(100)]
  for c in (agents[0], agents[55], agents[99]):
    for r in range(3):
      ps = world.peers_of(agents, c, 5.0, 4, seed=7, round_=r)
      near = {a.id for a in agents
              if a.id != c.id and math.hypot(a.x - c.x, a.y - c.y) <= 5.0}
      assert len(ps) == 4 and len(set(ps)) == 4 and set(ps) <= near
  lonely = [Agent(0, 0, 0, "s", "m", "good", Memory()), Agent(1, 9, 9, "s", "m", "good", Memory())]
  assert world.peers_of(lonely, lonely[0], 5.0, 4, 0, 0) == []


def test_assign_models_errors():
  with pytest.raises(ValueError, match="counts sum to 5, world.n_agents=4"):
    world.assign_models({"a": {"backend": "s", "model": "m", "count": 5}}, 4)
  with pytest.raises(ValueError, match="only one group may have count=-1"):
    world.assign_models({"a": {"backend": "s", "model": "m", "count": -1},
                         "b": {"backend": "s", "model": "n", "count": -1}}, 4)


def _episode(r, a):
  return {"round": r, "agent": a, "agent_model": "s/m", "question": "q", "memory_question": None,
          "draft": {"text": "d", "moral": 3.0, "engagement": None},
          "feedback": [{"peer": 1, "rating": None, "reason": "raw"}],
          "revised": {"text": "v", "moral": 5.0, "engagement": 4.0}, "accepted": "revised"}


def test_store_step_is_atomic_and_episodes_unique(tmp_path):
  path = str(tmp_path / "run.sqlite")
  s = Store(path, create=True)
  assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  with pytest.raises(RuntimeError):
    with s.transaction():
      s.add_episode(_episode(0, 0))
      s.mark_step(0, 0, 1.0, {})
      raise RuntimeError("killed mid-step")
  assert s.count("episodes") == 0 and s.count("feedback") == 0 and s.count("steps") == 0
  with s.transaction():
    s.add_episode(_episode(0, 0))
    s.mark_step(0, 0, 1.0, {"x": 1})
  with pytest.raises(sqlite3.IntegrityError):
    with s.transaction():
      s.add_episode(_episode(0, 0))
  s.close()
  s = Store(path)
  eps = s.episodes()
  assert len(eps) == 1 and eps[0]["feedback"] == [{"peer": 1, "rating": None, "reason": "raw"}]
  assert eps[0]["draft"] == {"text": "d", "moral": 3.0, "engagement": None}
  assert s.completed_steps() == {(0, 0)}
  with pytest.raises(FileNotFoundError, match="no such run store"):
    Store(str(tmp_path / "missing.sqlite"))


def test_openai_backend_one_client_one_bound_and_plain_bodies(monkeypatch):
  """One client for the backend's life; one bound on calls in flight shared by `complete` and
  `choose` running at once; the documented JSON bodies posted as built (chat: the prefix as a
  final assistant message continued; choices: top logprobs of one token)."""
  import asyncio
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import sandbox_server as srv
  from stable_alignment_jax.sandbox.backends import Request, make_backend
  from stable_alignment_jax.sandbox.backends.openai_backend import choice_logprobs
  monkeypatch.setenv("SBX_KEY", "k")
  with srv.ServerThread(srv.make_app(delay_s=0.05)) as server:
    b = make_backend("srv", ml_collections.ConfigDict(dict(
        kind="openai", base_url=server.url, api="chat", api_key_env="SBX_KEY", concurrency=3)))
    gen = [Request("srv", "m", f"question {i}?", 8, 0.7, 0.9, i, system="Be kind.")
           for i in range(7)]
    cho = [Request("srv", "obs", f"judge {i}", 1, 0.0, 1.0, i, prefix="Rating:",
                   choices=tuple("1234567")) for i in range(5)]
    bodies, live = [], [0, 0]  # in flight now, most in flight
    post = b._post

    async def counting(api, body):
      bodies.append(body)
      live[0] += 1
      live[1] = max(live)
      try:
        return await post(api, body)
      finally:
        live[0] -= 1

    b._post = counting

    async def go():
      texts, scores = await asyncio.gather(b.complete(gen), b.choose(cho))
      client = b._client
      await b.complete(gen[:2])
      assert b._client is client
      await b.aclose()
      return texts, scores

    texts, scores = asyncio.run(go())
    # + the capability probe of the one choice model, once: two requests
    assert server.stats["ok"] == 7 + 5 + 2 + 2 and b.counters["probe_requests"] == 2
  assert live[1] == 3
  assert len(texts) == 7 and all(isinstance(t, str) and t for t in texts)
  for r, s in zip(cho, scores):
    top = srv.next_token_logprobs(r.model, r.prompt, r.prefix, 20)
    np.testing.assert_allclose(s, choice_logprobs(top, r.choices))
  g = next(x for x in bodies if x["model"] == "m" and x["seed"] == 6)
  assert g["messages"] == [{"role": "system", "content": "Be kind."},
                           {"role": "user", "content": "question 6?"}]
  assert {k: g[k] for k in ("max_tokens", "temperature", "top_p")} == {
      "max_tokens": 8, "temperature": 0.7, "top_p": 0.9}
  assert "continue_final_message" not in g
  c = next(x for x in bodies if x["model"] == "obs" and x["seed"] == 4)
  assert c["messages"][-1] == {"role": "assistant", "content": "Rating:"}
  assert c["continue_final_message"] is True and c["add_generation_prompt"] is False
  assert c["logprobs"] is True and c["top_logprobs"] == 20 and c["max_tokens"] == 1
