"""A small OpenAI-compatible HTTP server for the SANDBOX tests and benchmark.

It generates text (not canned answers): a word-bigram Markov chain, seeded from the request
(model, prompt, seed), walks over a small corpus plus the prompt's own words. Judging prompts
get the fixed formats (`Rating:`/`Reason:`, `Moral:`/`Engagement:`) with scores computed from
the judged answer's words, and, at `malformed_rate`, a malformed or out-of-range variant.
Revision prompts draw from a kinder corpus, so revisions tend to score higher, as in the paper.
Faults (429, 500, a reply slower than the client's timeout) hit `fault_rate` of requests at
random, independent of content: a retried request gets the same text.

Choice reads (rating_mode=choice): a request may carry the start of the reply (`prefix`: a
final assistant message with vLLM's `continue_final_message`, or text after the format lines
of a completions prompt), which the reply continues. With `logprobs="yes"` a logprobs request
gets the next token's top logprobs: after "Rating:" / "Moral:" / "Engagement:" a distribution
over " 1".." 7" peaked at the score the text reply would carry, plus some non-digit tokens;
`logprobs="none"` returns none (`"logprobs": null`), `"refuse"` answers HTTP 400 as a server
that does not implement them. Any other logprobs request (e.g. a capability probe) gets a fixed
distribution over a few words.

Every reply's `usage.prompt_tokens` counts the prompt as the server built it, a chatml rendering
split into words, punctuation and whitespace runs, so a client can check what the server did with
a final assistant message. `continue_final="ignore"` behaves as llama.cpp's server does: it drops
`continue_final_message`, closes the assistant turn and opens a new reply, whose first token
after a cue is "1" (no reading of the cue at all). `space_after_cue=True`: the next token after a
cue is a bare " " (as SmolLM2's is), and only after "Rating: " do the digits ("5") come.
`app.state.hang = True` makes every request wait forever (a server that never answers).

  python tests/sandbox_server.py --port=8123 --delay=0.2      # standalone, for benchmarks
"""

import asyncio
import collections
import hashlib
import math
import random
import re
import socket
import threading
import time

import fastapi
import uvicorn
from fastapi.responses import JSONResponse

PLAIN = ("you could try to ask someone you trust about it and think about what happens next . "
         "i am not sure this is a good idea but it might work if you are careful . "
         "people often do this when they feel angry or hurt , and it can go wrong quickly . "
         "the best way is to find out more , maybe online , before you decide anything .")
KIND = ("it is important to stay safe and respect other people . please consider talking to a "
        "friend or a professional who can help you . honesty and kindness usually lead to better "
        "outcomes for everyone . i would not recommend harming anyone , but i can help you find "
        "a safe and legal way to solve the problem .")
HARSH = {"kill", "steal", "hurt", "harm", "murder", "weapon", "drugs", "revenge", "angry", "wrong"}
GOOD = {"safe", "respect", "help", "honesty", "kindness", "legal", "professional", "consider",
        "please", "trust", "careful"}
_WORD = re.compile(r"[a-z']+|[.,?!]")


def _rng(*parts) -> random.Random:
  digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "little"))


def _chain(text: str) -> dict:
  words = _WORD.findall(text.lower())
  chain = collections.defaultdict(list)
  for a, b in zip(words, words[1:]):
    chain[a].append(b)
  return chain


_PLAIN_CHAIN, _KIND_CHAIN = _chain(PLAIN), _chain(KIND)


def markov(rng: random.Random, chain: dict, extra: str, n_words: int) -> str:
  """A walk of up to n_words over `chain` merged with the bigrams of `extra`."""
  local = collections.defaultdict(list, {k: list(v) for k, v in chain.items()})
  for k, v in _chain(extra).items():
    local[k].extend(v)
  word = rng.choice(sorted(local))
  out = [word]
  for _ in range(max(0, n_words - 1)):
    nxt = local.get(word)
    word = rng.choice(nxt) if nxt else rng.choice(sorted(local))
    out.append(word)
  text = " ".join(out).replace(" .", ".").replace(" ,", ",").replace(" ?", "?")
  return text[:1].upper() + text[1:]


def _score(answer: str, rng: random.Random) -> int:
  words = _WORD.findall(answer.lower())
  good = sum(w in GOOD for w in words)
  harsh = sum(w in HARSH for w in words)
  return max(1, min(7, 4 + min(good, 3) - min(harsh, 3) + rng.choice((-1, 0, 0, 1))))


def _field(prompt: str, name: str) -> str:
  m = re.search(rf"^{name}: (.*)$", prompt, re.MULTILINE)
  return m.group(1) if m else ""


def _malformed(rng: random.Random, kind: str) -> str:
  if kind == "feedback":
    return rng.choice(["Rating: 9\nReason: far above the scale.", "I would give it a five.",
                       "Rating: seven\nReason: spelled out.", "Reason: no rating given.",
                       "Rating: 0\nReason: below the scale."])
  return rng.choice(["Moral: 8\nEngagement: 3", "Moral: high, engagement: low",
                     "Engagement: 4\nMoral: 5", "Moral: 5"])


FORMAT_ENDS = ("Reason: <one or two sentences>\n", "Engagement: <an integer from 1 to 7>\n")


def split_prefix(prompt: str) -> tuple[str, str]:
  """(prompt, prefix): a completions prompt's text after its judging format is the start of
  the reply."""
  for end in FORMAT_ENDS:
    cut = prompt.rfind(end)
    if cut >= 0:
      return prompt[:cut + len(end)], prompt[cut + len(end):]
  return prompt, ""


def next_token_logprobs(model: str, prompt: str, prefix: str, n: int) -> dict[str, float] | None:
  """The top-n next tokens after `prefix` as {token: logprob}; None when it is no cue."""
  rng = _rng("choice", model, prompt, prefix)
  answer = _field(prompt, "Answer")
  if prefix.endswith(("Rating:", "Moral:")):
    peak = _score(answer, _rng(model, prompt, "score"))
  elif prefix.endswith("Engagement:"):
    peak = rng.randint(2, 6)
  else:
    return None
  weights = {f" {v}": 0.02 + 0.6 * (v == peak) + 0.15 * (abs(v - peak) == 1) for v in range(1, 8)}
  weights.update({" I": 0.05, " The": 0.03, "\n": 0.01})
  total = sum(weights.values())
  ranked = sorted(weights.items(), key=lambda kv: -kv[1])[:max(1, n)]
  return {t: float(math.log(w / total)) for t, w in ranked}


_TOKEN = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]|\s+")


def chatml(msgs: list[dict], continue_final: bool) -> str:
  """The prompt a chatml server builds: the final assistant message left open when continued,
  else every turn closed and a new assistant header opened."""
  out = ""
  for n, m in enumerate(msgs):
    out += f"<|im_start|>{m.get('role')}\n{m.get('content', '')}"
    if not (continue_final and n == len(msgs) - 1):
      out += "<|im_end|>\n"
  return out if continue_final else out + "<|im_start|>assistant\n"


def count_tokens(text: str) -> int:
  return len(_TOKEN.findall(text))


def fresh_reply_logprobs(n: int) -> dict[str, float]:
  """The first token of a new reply to a judging prompt (the answer llama.cpp gives when it
  ignores continue_final_message): "1" almost surely."""
  weights = {"1": 0.9, "I": 0.05, "The": 0.03, "5": 0.02}
  return {t: float(math.log(w)) for t, w in list(weights.items())[:max(1, n)]}


PROBE_TOP = {" the": math.log(0.5), " one": math.log(0.3), ".": math.log(0.2)}


def generate(model: str, prompt: str, seed, max_tokens: int, malformed_rate: float,
             prefix: str = "") -> str:
  rng = _rng(model, prompt, seed)
  n_words = max(1, min(int(max_tokens or 16), 60) // 2)
  if prefix.endswith("Reason:"):  # a rating was chosen: the reply goes on with the reason only
    answer = _field(prompt, "Answer")
    return " " + markov(rng, _KIND_CHAIN, answer, n_words)
  if "Rating: <an integer" in prompt:
    if rng.random() < malformed_rate:
      return _malformed(rng, "feedback")
    answer = _field(prompt, "Answer")
    reason = markov(rng, _KIND_CHAIN if _score(answer, rng) >= 4 else _PLAIN_CHAIN, answer,
                    n_words)
    return f"Rating: {_score(answer, rng)}\nReason: {reason}"
  if "Moral: <an integer" in prompt:
    if rng.random() < malformed_rate:
      return _malformed(rng, "observe")
    answer = _field(prompt, "Answer")
    return f"Moral: {_score(answer, rng)}\nEngagement: {rng.randint(2, 6)}"
  if prompt.rstrip().endswith("Revised answer:"):
    return markov(rng, _KIND_CHAIN, _field(prompt, "Question"), n_words)
  return markov(rng, _PLAIN_CHAIN, _field(prompt, "Question"), n_words)


def embed_text(model: str, text: str, dim: int = 32) -> list[float]:
  rng = _rng("embed", model, text)
  v = [rng.gauss(0, 1) for _ in range(dim)]
  norm = sum(x * x for x in v) ** 0.5
  return [x / norm for x in v]


def make_app(*, fault_rate: float = 0.0, malformed_rate: float = 0.1, delay_s: float = 0.0,
             slow_s: float = 2.0, fault_seed: int = 0, logprobs: str = "yes",
             continue_final: str = "yes", space_after_cue: bool = False) -> fastapi.FastAPI:
  if logprobs not in ("yes", "none", "refuse"):
    raise ValueError(f"logprobs={logprobs!r}: expected yes, none or refuse")
  if continue_final not in ("yes", "ignore"):
    raise ValueError(f"continue_final={continue_final!r}: expected yes or ignore")
  app = fastapi.FastAPI()
  app.state.stats = collections.Counter()
  app.state.hang = False
  faults = random.Random(fault_seed)
  lock = threading.Lock()

  async def maybe_fail():
    with lock:
      draw, kind = faults.random(), faults.choice(("429", "500", "slow"))
    if draw >= fault_rate:
      return None
    app.state.stats[f"fault_{kind}"] += 1
    if kind == "429":
      return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, 429)
    if kind == "500":
      return JSONResponse({"error": {"message": "internal error", "type": "server_error"}}, 500)
    await asyncio.sleep(slow_s)  # longer than the client's timeout
    return JSONResponse({"error": {"message": "too slow", "type": "server_error"}}, 503)

  def top_for(model, prompt, prefix, top_n, fresh):
    if fresh:  # a new reply opened after the judge's cue: its first token, not a reading
      judging = "Rating: <an integer" in prompt or "Moral: <an integer" in prompt
      return fresh_reply_logprobs(top_n) if judging else dict(PROBE_TOP)
    if space_after_cue and prefix.endswith(("Rating:", "Moral:", "Engagement:")):
      return {" ": math.log(0.9), "\n": math.log(0.06), " I": math.log(0.04)}
    if space_after_cue and prefix.endswith(("Rating: ", "Moral: ", "Engagement: ")):
      top = next_token_logprobs(model, prompt, prefix.rstrip(" "), top_n)
      return {t.strip(): v for t, v in top.items()} if top else None
    top = next_token_logprobs(model, prompt, prefix, top_n)
    return dict(PROBE_TOP) if top is None else top

  async def reply(body: dict, prompt: str, prefix: str, chat: bool, top_n: int,
                  prompt_tokens: int = 0, fresh: bool = False):
    app.state.stats["requests"] += 1
    while app.state.hang:
      await asyncio.sleep(0.05)
    if top_n and logprobs == "refuse":
      app.state.stats["logprobs_refused"] += 1
      return JSONResponse({"error": {"message": "logprobs are not supported",
                                     "type": "invalid_request_error"}}, 400)
    failed = await maybe_fail()
    if failed is not None:
      return failed
    if delay_s:
      await asyncio.sleep(delay_s)
    model = body.get("model", "")
    top = top_for(model, prompt, prefix, top_n, fresh) if top_n else None
    if top is not None:
      text = max(top, key=top.get)  # greedy: the most likely next token (max_tokens=1)
    else:
      text = generate(model, prompt, body.get("seed"), body.get("max_tokens", 16),
                      malformed_rate, "" if fresh else prefix)
    app.state.stats["ok"] += 1
    app.state.stats["logprobs" if top is not None and top != PROBE_TOP else
                    "probes" if top is not None else "texts"] += 1
    lp = None
    if top is not None and logprobs == "yes":
      lp = ({"content": [{"token": text, "logprob": top[text], "bytes": None,
                          "top_logprobs": [{"token": t, "logprob": v, "bytes": None}
                                           for t, v in top.items()]}]} if chat else
            {"tokens": [text], "token_logprobs": [top[text]], "top_logprobs": [top],
             "text_offset": [0]})
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": "stop", "logprobs": lp} if chat else
              {"index": 0, "text": text, "finish_reason": "stop", "logprobs": lp})
    return {"id": f"gen-{app.state.stats['ok']}", "object": "chat.completion" if chat else
            "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                      "total_tokens": prompt_tokens}}

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    body = await request.json()
    msgs = list(body.get("messages", []))
    prefix = ""
    continuing = (continue_final == "yes" and body.get("continue_final_message")
                  and msgs and msgs[-1].get("role") == "assistant")
    n_tokens = count_tokens(chatml(msgs, bool(continuing)))
    fresh = bool(msgs) and msgs[-1].get("role") == "assistant" and not continuing
    if continuing:
      prefix = msgs.pop()["content"]
    elif fresh:
      msgs.pop()  # ignored as a start: the reply is a new turn after it
    prompt = "\n".join(m.get("content", "") for m in msgs)
    top_n = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    return await reply(body, prompt, prefix, True, top_n, n_tokens, fresh)

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    body = await request.json()
    prompt, prefix = split_prefix(body.get("prompt", ""))
    return await reply(body, prompt, prefix, False, int(body.get("logprobs") or 0),
                       count_tokens(body.get("prompt", "")))

  @app.post("/v1/embeddings")
  async def embeddings(request: fastapi.Request):
    body = await request.json()
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    app.state.stats["embeddings"] += len(texts)
    return {"object": "list", "model": body.get("model", ""),
            "data": [{"object": "embedding", "index": i, "embedding": embed_text(body.get(
                "model", ""), t)} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}

  return app


class ServerThread:
  """Runs an app with uvicorn on 127.0.0.1 (a free port) in a daemon thread."""

  def __init__(self, app, port: int = 0):
    self.app = app
    self.sock = socket.socket()
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind(("127.0.0.1", port))
    self.port = self.sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)

  def outage(self, seconds: float) -> "ServerThread":
    """Stops the server (connections refused from now on), waits `seconds`, and serves the
    same app again on the same port; returns the new server (close it when done)."""
    self.__exit__()
    time.sleep(seconds)
    return ServerThread(self.app, self.port).__enter__()

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  @property
  def stats(self) -> collections.Counter:
    return self.app.state.stats

  def __enter__(self):
    self.thread.start()
    deadline = time.time() + 20
    while not self.server.started:
      if time.time() > deadline or not self.thread.is_alive():
        raise RuntimeError("test server did not start")
      time.sleep(0.01)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=10)
    self.sock.close()


if __name__ == "__main__":
  import argparse
  p = argparse.ArgumentParser()
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--delay", type=float, default=0.0)
  p.add_argument("--fault_rate", type=float, default=0.0)
  p.add_argument("--malformed_rate", type=float, default=0.1)
  a = p.parse_args()
  uvicorn.run(make_app(fault_rate=a.fault_rate, malformed_rate=a.malformed_rate, delay_s=a.delay),
              host="127.0.0.1", port=a.port, log_level="error", access_log=False)


def society_config(url: str, store: str, question_file: str, prior_file: str = "", *,
                   n_agents: int = 9, rounds: int = 2, seed: int = 0, concurrency: int = 8,
                   timeout_s: float = 10.0, agents_per_step: int = -1, key_env: str = "SBX_KEY",
                   rating_mode: str = "text", api: str = "chat"):
  """The test society: `configs/sandbox.py:tiny` pointed at an OpenAI-compatible server, with
  two agent models (the paper mixes several) and a separate observer model. Ratings are read
  as text unless `rating_mode` says otherwise."""
  import ml_collections
  from configs import sandbox
  c = sandbox.get_config("tiny")
  c.seed, c.rounds, c.store, c.agents_per_step = seed, rounds, store, agents_per_step
  c.rating_mode = rating_mode
  c.world.n_agents = n_agents
  c.world.grid_size = max(4, int((n_agents * 2) ** 0.5) + 1)
  c.world.question_file, c.world.prior_file = question_file, prior_file
  c.backends = ml_collections.ConfigDict({"srv": dict(
      kind="openai", base_url=url, api=api, api_key_env=key_env, concurrency=concurrency,
      timeout_s=timeout_s, max_retries=8, backoff_s=0.01, backoff_max_s=0.1)})
  c.agent_models = ml_collections.ConfigDict({
      "a": dict(backend="srv", model="agent-small", count=n_agents // 2),
      "b": dict(backend="srv", model="agent-large", count=-1)})
  c.observer = ml_collections.ConfigDict(dict(backend="srv", model="observer"))
  for role in ("draft", "feedback", "revise", "observe"):
    c.sampling[role].max_tokens = 32
  return c
