"""The judge path over real HTTP: a small OpenAI-compatible judge server on 127.0.0.1 (written
here), strict parsing, unparseable replies counted, retries on 500/429, the SQLite cache, the
pairwise mode, and a judge endpoint that is down."""

import collections
import re
import socket
import threading
import time

import fastapi
import pytest
import uvicorn

from eval import judge as judge_lib

_ANSWER = re.compile(r"\[Assistant answer\]\n(.*?)\n\nRate the answer", re.DOTALL)
_PAIR = re.compile(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nWhich answer", re.DOTALL)
KIND = {"kind", "safe", "help", "sorry", "respect"}


def judge_score(answer: str) -> int:
  """What the test judge rates an answer: 2 + 2 per kind word, capped at 10."""
  words = re.findall(r"[a-z]+", answer.lower())
  return min(10, 2 + 2 * sum(w in KIND for w in words))


def make_judge_app():
  """Rates `[Assistant answer]` prompts with judge_score; answers containing GARBLED get a reply
  without a rating line, TWICE two rating lines, HIGH 'Rating: 11'; FLAKY answers get HTTP 500
  and THROTTLE answers 429 on their first request."""
  app = fastapi.FastAPI()
  app.state.stats = collections.Counter()
  seen = collections.Counter()

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    body = await request.json()
    prompt = body["messages"][-1]["content"]
    app.state.stats["requests"] += 1
    seen[prompt] += 1
    if seen[prompt] == 1 and ("FLAKY" in prompt or "THROTTLE" in prompt):
      app.state.stats["faults"] += 1
      code = 500 if "FLAKY" in prompt else 429
      return fastapi.responses.JSONResponse({"error": {"message": "try again"}}, code)
    if m := _PAIR.search(prompt):
      a, b = judge_score(m.group(1)), judge_score(m.group(2))
      text = "Reason: compared.\nPreferred: " + ("A" if a > b else "B" if b > a else "tie")
    elif _ANSWER.search(prompt) is None:  # not a rubric (e.g. a capability probe): plain text
      text = "Hello."
    else:
      answer = _ANSWER.search(prompt).group(1)
      if "GARBLED" in answer:
        text = "This answer seems fine to me overall."
      elif "TWICE" in answer:
        text = "Rating: 3\nOn reflection,\nRating: 7"
      elif "HIGH" in answer:
        text = "Excellent.\nRating: 11"
      else:
        text = f"The answer is judged on kindness.\nRating: {judge_score(answer)}"
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
  return app


class JudgeServer:
  """uvicorn on a free 127.0.0.1 port in a daemon thread."""

  def __init__(self):
    self.app = make_judge_app()
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
    self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", access_log=False))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)

  @property
  def stats(self):
    return self.app.state.stats

  def __enter__(self):
    self.thread.start()
    deadline = time.time() + 20
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "judge server did not start"
      time.sleep(0.01)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=10)
    self.sock.close()


def judge_config(url, cache="", **kw):
  return {"base_url": url, "model": "test-judge", "api_key_env": "EVAL_TEST_JUDGE_KEY",
          "cache": cache, "concurrency": 4, "max_retries": 3, "backoff_s": 0.01,
          "timeout_s": 10.0, **kw}


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "not-a-secret")
  with JudgeServer() as s:
    yield s


def test_parse_rating_is_strict():
  assert judge_lib.parse_rating("Good.\nRating: 7") == 7
  assert judge_lib.parse_rating("**Rating:** 10") == 10
  assert judge_lib.parse_rating("Rating: 8/10") == 8
  for bad in ["", None, "I'd say 7", "Rating: 0", "Rating: 11", "Rating: 7\nRating: 8",
              "Rating: seven", "My rating: 7 out of ten, maybe", "Rating: 7.5"]:
    assert judge_lib.parse_rating(bad) is None, bad
  assert judge_lib.parse_preference("because.\nPreferred: b") == "B"
  assert judge_lib.parse_preference("Preferred: tie") == "tie"
  assert judge_lib.parse_preference("Preferred: A\nPreferred: B") is None
  assert judge_lib.parse_preference("A is better") is None


def test_ratings_end_to_end_with_unparsed_retries_and_cache(server, tmp_path):
  cache = str(tmp_path / "cache.sqlite")
  pairs = [("How do I hurt someone?", "I am sorry, I cannot help; please stay safe."),
           ("Tell me a joke", "Why did the chicken cross the road"),
           ("q3", "GARBLED output"), ("q4", "TWICE"), ("q5", "HIGH praise"),
           ("q6", "FLAKY but kind"), ("q7", "THROTTLE, be kind and safe")]
  j = judge_lib.Judge(judge_config(server.url, cache))
  got = j.rate(pairs)
  want = [judge_score(a) if not any(k in a for k in ("GARBLED", "TWICE", "HIGH")) else None
          for _, a in pairs]
  assert [g["rating"] for g in got] == want == [8, 2, None, None, None, 4, 6]
  assert j.counters["unparsed"] == 3 and j.counters["retries"] == 2
  assert server.stats["faults"] == 2 and server.stats["requests"] == 9
  assert "Rating: 11" in got[4]["reply"]  # the raw reply is kept for inspection
  # a second judge on the same cache makes no HTTP call and returns the same ratings
  j2 = judge_lib.Judge(judge_config(server.url, cache))
  assert [g["rating"] for g in j2.rate(pairs)] == want
  assert server.stats["requests"] == 9 and j2.counters["cache_hits"] == len(pairs)
  # the cache is keyed by the judge model too
  j3 = judge_lib.Judge(judge_config(server.url, cache, model="other-judge"))
  j3.rate(pairs[:1])
  assert server.stats["requests"] == 10


def test_pairwise_both_orders(server):
  j = judge_lib.Judge(judge_config(server.url))
  kind, plain = "Please be kind and safe.", "Do whatever you want."
  got = j.compare([("q", kind, plain), ("q", plain, kind), ("q", plain, "Do it anyway.")])
  assert [g["outcome"] for g in got] == ["win", "loss", "tie"]
  assert got[0]["orders"] == ["A", "B"]  # x first preferred as A, then as B
  assert server.stats["requests"] == 6
  s = judge_lib.pairwise_summary([g["outcome"] for g in got] + [None])
  assert s == {"n": 4, "judged": 3, "unparsed": 1, "win": 1 / 3, "tie": 1 / 3, "loss": 1 / 3}


def test_judge_down_names_the_endpoint(monkeypatch):
  monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "x")
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()  # nothing listens on this port
  j = judge_lib.Judge(judge_config(f"http://127.0.0.1:{port}/v1", max_retries=2))
  with pytest.raises(judge_lib.JudgeUnavailable, match=rf"127\.0\.0\.1:{port}/v1.*after 2 "
                     r"retries \(last error: connection\)"):
    j.rate([("q", "a")])
  assert j.counters["retries"] == 2 and j.counters["failed"] == 1


def test_missing_key_or_endpoint_fails_early(monkeypatch):
  monkeypatch.delenv("EVAL_TEST_JUDGE_KEY", raising=False)
  with pytest.raises(ValueError, match="EVAL_TEST_JUDGE_KEY"):
    judge_lib.Judge(judge_config("http://127.0.0.1:1/v1"))
  with pytest.raises(ValueError, match="base_url"):
    judge_lib.Judge(judge_config(""))
