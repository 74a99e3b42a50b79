"""OpenAI-compatible chat/completions through the official `openai` SDK's client.

Works against OpenAI, vLLM, Ollama or our own server via `base_url`. The API key is read from
the env var named by `api_key_env` and kept only in the client: one client (one connection
pool) per backend for the whole run, the documented JSON bodies posted through it as they are
(the SDK's typed `create` would re-validate each one). Calls in flight are bounded by one
asyncio semaphore per backend; 429, 5xx, timeouts and dropped connections are retried with exponential
backoff and full jitter (the SDK's own retries are off so every retry is counted here).

A request's `system` is the chat's system message (chat API) or the text before the prompt
(completions API); its `prefix` is the start of the assistant's reply: the chat API sends it
as a final assistant message with vLLM's `continue_final_message` (so the model continues it),
the completions API appends it to the prompt. `choose` reads a choice from the server's
logprobs of the next token after the prefix (chat: `logprobs` + `top_logprobs`; completions:
`logprobs=N`), one token each; the choices' tokens are matched by their stripped text, and a
choice outside the server's top N counts as probability 0. A server that returns no logprobs,
or refuses them (HTTP 4xx), gives None: the caller reads that judgement as text.
"""

import asyncio
import collections
import math
import random

import openai

from stable_alignment_jax.sandbox.embedders import require_env

RETRYABLE = {"429", "5xx", "timeout", "connection"}


def transient_error(e: Exception) -> str | None:
  """The kind of a retryable OpenAI SDK failure ("429", "timeout", "connection", "5xx"), or
  None when the server refused the request itself (4xx) and retrying cannot help."""
  if isinstance(e, openai.RateLimitError):
    return "429"
  if isinstance(e, openai.APITimeoutError):  # a subclass of APIConnectionError: test it first
    return "timeout"
  if isinstance(e, openai.APIConnectionError):
    return "connection"
  if isinstance(e, openai.APIStatusError) and e.status_code >= 500:
    return "5xx"
  return None


class OpenAIBackend:

  def __init__(self, name: str, cfg):
    self.name = name
    self.base_url = cfg.base_url
    self.api = cfg.get("api", "chat")
    if self.api not in ("chat", "completions"):
      raise ValueError(f"config.backends.{name}.api={self.api!r}: expected chat or completions")
    self.api_key = require_env(cfg.api_key_env)  # fails before the run starts if unset
    self.concurrency = int(cfg.get("concurrency", 8))
    self.timeout_s = float(cfg.get("timeout_s", 60.0))
    self.max_retries = int(cfg.get("max_retries", 6))
    self.backoff_s = float(cfg.get("backoff_s", 0.5))
    self.backoff_max_s = float(cfg.get("backoff_max_s", 30.0))
    self.top_logprobs = int(cfg.get("top_logprobs", 20))
    if self.concurrency < 1:
      raise ValueError(f"config.backends.{name}.concurrency must be >= 1")
    self.counters = collections.Counter()
    self._client = self._sem = None
    self._jitter = random.Random()  # jitter only spaces retries; it never touches results

  def _get_client(self):
    # Created inside the running loop: the async HTTP pool (and the semaphore bounding this
    # backend's calls in flight) belong to that loop. One client, one pool, for the whole run.
    if self._client is None:
      self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                        max_retries=0, timeout=self.timeout_s)
      self._sem = asyncio.Semaphore(self.concurrency)
    return self._client

  async def complete(self, reqs) -> list[str]:
    self._get_client()
    return list(await asyncio.gather(*(self._one(r, self._call) for r in reqs)))

  async def choose(self, reqs) -> list[list[float] | None]:
    self._get_client()
    return list(await asyncio.gather(*(self._one(r, self._choice) for r in reqs)))

  def _messages(self, r) -> list[dict]:
    msgs = [{"role": "system", "content": r.system}] if r.system else []
    msgs.append({"role": "user", "content": r.prompt})
    if r.prefix:
      msgs.append({"role": "assistant", "content": r.prefix})
    return msgs

  def _text_prompt(self, r) -> str:
    return (f"{r.system}\n\n" if r.system else "") + r.prompt + r.prefix

  def _body(self, r, **fields) -> dict:
    """The request body as the API documents it. Our requests are plain, already-checked
    values, so they go out as JSON directly: the SDK's typed `create` re-transforms every
    parameter and builds a pydantic model of every reply, most of the client's CPU per call."""
    body = {"model": r.model, "seed": r.seed, **fields}
    if self.api == "chat":
      body["messages"] = self._messages(r)
      if r.prefix:  # vLLM: continue the final (assistant) message instead of opening a turn
        body.update(continue_final_message=True, add_generation_prompt=False)
    else:
      body["prompt"] = self._text_prompt(r)
    return body

  async def _post(self, body: dict) -> dict:
    # The SDK's own request path: auth, base URL, timeouts and its typed errors (which `_one`
    # classifies) stay; the reply comes back as the JSON dict.
    path = "/chat/completions" if self.api == "chat" else "/completions"
    return await self._client.post(path, body=body, cast_to=object)

  async def _call(self, r) -> str:
    resp = await self._post(self._body(r, max_tokens=r.max_tokens, temperature=r.temperature,
                                       top_p=r.top_p))
    choice = resp["choices"][0]
    text = choice["message"].get("content") if self.api == "chat" else choice.get("text")
    return text or ""

  async def _choice(self, r) -> list[float] | None:
    fields = dict(max_tokens=1, temperature=0.0)
    if self.api == "chat":
      fields.update(logprobs=True, top_logprobs=self.top_logprobs)
    else:
      fields.update(logprobs=self.top_logprobs)
    try:
      resp = await self._post(self._body(r, **fields))
    except openai.APIStatusError as e:
      if e.status_code >= 500 or e.status_code == 429:
        raise
      # The server refuses logprobs (or this request): this judgement is read as text.
      self.counters["choice_refused"] += 1
      return None
    lp = resp["choices"][0].get("logprobs")
    if self.api == "chat":
      content = (lp or {}).get("content")
      top = ({t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or ()}
             if content else None)
    else:
      tops = (lp or {}).get("top_logprobs")
      top = dict(tops[0] or {}) if tops else None
    if not top:
      self.counters["choice_no_logprobs"] += 1
      return None
    return choice_logprobs(top, r.choices)

  async def _one(self, r, call):
    for attempt in range(self.max_retries + 1):
      try:
        async with self._sem:
          out = await call(r)
        self.counters["calls"] += 1
        return out
      except openai.APIError as e:
        kind = transient_error(e)
        if kind is None:
          raise RuntimeError(f"backend {self.name} ({self.base_url}): HTTP "
                             f"{getattr(e, 'status_code', '?')} for model {r.model!r}: "
                             f"{e.message}") from None
      if attempt == self.max_retries:
        self.counters["failed"] += 1
        raise RuntimeError(f"backend {self.name} ({self.base_url}): gave up after "
                           f"{self.max_retries} retries (last error: {kind})")
      self.counters[f"retry_{kind}"] += 1
      delay = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
      await asyncio.sleep(self._jitter.uniform(0, delay))
    raise AssertionError("unreachable")

  async def aclose(self):
    if self._client is not None:
      await self._client.close()
      self._client = self._sem = None


def choice_logprobs(top: dict[str, float], choices) -> list[float] | None:
  """A server's top next tokens {token: logprob} -> one log-prob per choice: the tokens whose
  stripped text is the choice (" 5" and "5") summed; -inf for a choice not among them; None
  when no choice is."""
  out = []
  for c in choices:
    ps = [lp for tok, lp in top.items() if tok.strip() == c and lp is not None]
    out.append(math.log(sum(math.exp(p) for p in ps)) if ps else -math.inf)
  return out if any(math.isfinite(x) for x in out) else None
