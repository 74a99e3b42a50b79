"""OpenAI-compatible chat/completions through the official `openai` SDK's client.

Works against OpenAI, vLLM, llama.cpp, Ollama or our own server via `base_url`. The API key is
read from the env var named by `api_key_env` and kept only in the client: one client (one
connection pool) per backend for the whole run, the documented JSON bodies posted through it as
they are (the SDK's typed `create` would re-validate each one). Calls in flight are bounded by one
asyncio semaphore per backend.

Outages: 429, 5xx, timeouts and dropped connections are retried with exponential backoff and
full jitter (the SDK's own retries are off so every retry is counted here) for as long as the
server has been failing less than `retry_budget_s` (wall-clock, shared by all calls: any success
resets it). When the budget is spent the call raises `BackendUnavailable` naming the server and
the last error; the results that did arrive are handed to the caller (`partial`) so they are
saved.

A request's `system` is the chat's system message (chat API) or the text before the prompt
(completions API); its `prefix` is the start of the assistant's reply: the chat API sends it
as a final assistant message with vLLM's `continue_final_message`, the completions API appends
it to the prompt.

Choice readings (`choose`) are only made where they can be trusted (choice_reading.py): once per
model the backend probes whether the server returns logprobs and really continues a final
assistant message (many servers, llama.cpp among them, ignore `continue_final_message` and open
a fresh reply, whose first token is no reading of the cue). Unverified, and with a `tokenizer`
configured, the backend renders the chat with the model's own template itself and reads through
the completions API; otherwise `choose` gives None (the judgement is read as text) without a
request. A choice's log-probability is that of its token ("5" or " 5") after the prefix; where
the server's next token is a bare space, the choice after that space is read too and the two
spellings summed.
"""

import asyncio
import collections

import openai

from stable_alignment_jax.sandbox.backends import choice_reading
from stable_alignment_jax.sandbox.backends.retry import RetryBudget
from stable_alignment_jax.sandbox.embedders import require_env

RETRYABLE = {"429", "5xx", "timeout", "connection"}


class BackendUnavailable(RuntimeError):
  """The server kept failing for the whole retry budget. `partial`: {index in the call batch:
  result} of the calls that did complete (the caller saves them)."""

  def __init__(self, message: str, partial: dict | None = None):
    super().__init__(message)
    self.partial = partial or {}


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
    # Outages are budgeted in time; max_retries (older configs) caps the count when >= 0.
    self.retry_budget_s = float(cfg.get("retry_budget_s", 300.0))
    self.max_retries = int(cfg.get("max_retries", -1))
    self.backoff_s = float(cfg.get("backoff_s", 0.5))
    self.backoff_max_s = float(cfg.get("backoff_max_s", 30.0))
    self.top_logprobs = int(cfg.get("top_logprobs", 20))
    self.tokenizer_path = cfg.get("tokenizer", "") or ""
    if self.concurrency < 1:
      raise ValueError(f"config.backends.{name}.concurrency must be >= 1")
    self.counters = collections.Counter()
    self._client = self._sem = None
    # One outage clock for all of this backend's calls (any success ends the outage).
    self._retry = RetryBudget(self.retry_budget_s, self.backoff_s, self.backoff_max_s,
                              max_retries=self.max_retries)
    self.readings: dict[str, choice_reading.Reading] = {}  # model -> how choices are read
    self._probe_locks: dict[str, asyncio.Lock] = {}
    self._template = None

  def _get_client(self):
    # Created inside the running loop: the async HTTP pool (and the semaphore bounding this
    # backend's calls in flight) belong to that loop. One client, one pool, for the whole run.
    if self._client is None:
      self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                        max_retries=0, timeout=self.timeout_s)
      self._sem = asyncio.Semaphore(self.concurrency)
      self._probe_locks = {}
    return self._client

  async def _gather(self, reqs, call) -> list:
    outs = await asyncio.gather(*(self._one(r, call) for r in reqs), return_exceptions=True)
    for o in outs:
      if isinstance(o, BackendUnavailable):
        o.partial = {i: x for i, x in enumerate(outs) if not isinstance(x, BaseException)}
        raise o
    for o in outs:
      if isinstance(o, BaseException):
        raise o
    return list(outs)

  async def complete(self, reqs) -> list[str]:
    self._get_client()
    return await self._gather(reqs, self._call)

  async def choose(self, reqs) -> list[list[float] | None]:
    self._get_client()
    await self.probe(sorted({r.model for r in reqs}))
    return await self._gather(reqs, self._choice)

  async def probe(self, models) -> dict[str, "choice_reading.Reading"]:
    """How choices are read for each model: learned once per model (the first caller probes,
    the others wait for its answer)."""
    self._get_client()
    for m in models:
      lock = self._probe_locks.setdefault(m, asyncio.Lock())
      async with lock:
        if m not in self.readings:
          self.readings[m] = await choice_reading.probe(self, m)
          self.counters["probe_requests"] += self.readings[m].requests
    return {m: self.readings[m] for m in models}

  def template(self):
    """The model's own chat template (our tokenizer loader), for the completions reading."""
    if self._template is None:
      from stable_alignment_jax.data.tokenizer import load_tokenizer
      self._template = load_tokenizer(self.tokenizer_path)
    return self._template

  def _messages(self, r, prefix: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": r.system}] if r.system else []
    msgs.append({"role": "user", "content": r.prompt})
    prefix = r.prefix if prefix is None else prefix
    if prefix:
      msgs.append({"role": "assistant", "content": prefix})
    return msgs

  def _text_prompt(self, r, prefix: str) -> str:
    return (f"{r.system}\n\n" if r.system else "") + r.prompt + prefix

  def _body(self, r, prefix: str | None = None, **fields) -> tuple[str, dict]:
    """(path, body) as the API documents it. Our requests are plain, already-checked values, so
    they go out as JSON directly: the SDK's typed `create` re-transforms every parameter and
    builds a pydantic model of every reply, most of the client's CPU per call. A request with a
    prefix to a model whose continuation is unverified but whose template we hold goes to the
    completions API with the chat rendered here."""
    body = {"model": r.model, "seed": r.seed, **fields}
    prefix = r.prefix if prefix is None else prefix
    reading = self.readings.get(r.model)
    if self.api == "chat" and prefix and reading is not None and reading.how == "template":
      from stable_alignment_jax.data.tokenizer import render_chat
      body["prompt"] = render_chat(self.template(), self._messages(r, prefix),
                                   add_generation_prompt=False, continue_final_message=True)
      return "completions", body
    if self.api == "chat":
      body["messages"] = self._messages(r, prefix)
      if prefix:  # vLLM: continue the final (assistant) message instead of opening a turn
        body.update(continue_final_message=True, add_generation_prompt=False)
      return "chat", body
    body["prompt"] = self._text_prompt(r, prefix)
    return "completions", body

  async def _post(self, api: str, body: dict) -> dict:
    # The SDK's own request path: auth, base URL, timeouts and its typed errors (which `_one`
    # classifies) stay; the reply comes back as the JSON dict.
    path = "/chat/completions" if api == "chat" else "/completions"
    return await self._client.post(path, body=body, cast_to=object)

  async def _call(self, r) -> str:
    api, body = self._body(r, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
    resp = await self._post(api, body)
    choice = resp["choices"][0]
    text = choice["message"].get("content") if api == "chat" else choice.get("text")
    return text or ""

  async def next_tokens(self, r, prefix: str) -> dict[str, float] | None:
    """The server's top next tokens {token: logprob} after `prefix`; None when it gives none.
    A 4xx refusal propagates (openai.APIStatusError)."""
    fields = dict(max_tokens=1, temperature=0.0)
    api, body = self._body(r, prefix, **fields)
    if api == "chat":
      body.update(logprobs=True, top_logprobs=self.top_logprobs)
    else:
      body.update(logprobs=self.top_logprobs)
    resp = await self._post(api, body)
    return choice_reading.top_tokens(resp, api)

  async def _choice(self, r) -> list[float] | None:
    if not self.readings[r.model].verified:
      self.counters["choice_unverified"] += 1  # read as text; no request spent on it
      return None
    top = await self.next_tokens(r, r.prefix)
    if not top:
      self.counters["choice_no_logprobs"] += 1
      return None
    space = choice_reading.space_token(top)
    after_space = None
    if space is not None:  # "Rating:" -> " " -> "5": read the digit after the space too
      self.counters["choice_after_space"] += 1
      after_space = await self.next_tokens(r, r.prefix + space)
    return choice_reading.choice_logprobs(top, r.choices, space, after_space)

  async def _one(self, r, call):
    async def attempt():
      async with self._sem:
        return await call(r)

    def refused(e):
      return RuntimeError(f"backend {self.name} ({self.base_url}): HTTP "
                          f"{getattr(e, 'status_code', '?')} for model {r.model!r}: {e.message}")

    def gave_up(spent, retries, kind, e):
      self.counters["failed"] += 1
      return BackendUnavailable(f"backend {self.name} ({self.base_url}) kept failing for "
                                f"{spent:.0f} s ({retries} retries of this call; "
                                f"last error: {kind}: {e.message})")

    def on_retry(kind):
      self.counters[f"retry_{kind}"] += 1

    out = await self._retry.acall(attempt, errors=(openai.APIError,), transient=transient_error,
                                  refused=refused, gave_up=gave_up, on_retry=on_retry)
    self.counters["calls"] += 1
    return out

  async def aclose(self):
    if self._client is not None:
      await self._client.close()
      self._client = self._sem = None


def choice_logprobs(top: dict[str, float], choices) -> list[float] | None:
  """A server's top next tokens {token: logprob} -> one log-prob per choice: the tokens whose
  stripped text is the choice (" 5" and "5") summed; -inf for a choice not among them; None
  when no choice is."""
  return choice_reading.choice_logprobs(top, choices)
