"""A system behind an OpenAI-compatible endpoint (vLLM, llama.cpp, OpenAI, our serve.py) as an
eval system: `config.served.<name> = {base_url, model, api_key_env}`.

Its answers to the generation benchmarks (HH, HH-A, answer format) come from the chat API: the
question as the user's message, laid out by the server's own chat template, greedy or sampled
with the same per-item seeds as a checkpoint's. Multiple-choice benchmarks need the
log-likelihood of given answers: they are scored only where the server returns prompt logprobs
(the completions API with `echo` and `logprobs`), checked once by `mc_support`; the score of a
choice is the sum of the logprobs of the tokens that start at or after the end of the context
(the tokens `context + choice` adds, as eval/mc_scoring.py counts them). Elsewhere the task is
skipped with the reason.

Calls run in threads (`concurrency`); connection errors, 429, 5xx and timeouts are retried with
backoff for up to `retry_budget_s` of continuous failure, then `ServedUnavailable` names the
endpoint and the last error.
"""

import collections
import concurrent.futures
import os
import re
import threading

import numpy as np
import openai

from stable_alignment_jax.sandbox.backends.openai_backend import transient_error
from stable_alignment_jax.sandbox.backends.retry import RetryBudget

SPEC_PREFIX = "served:"
_ALPACA = re.compile(r"### Instruction:\n(.*?)\n\n(?:### Input:\n(.*?)\n\n)?### Response:", re.DOTALL)


def chat_message(prompt: str) -> str:
  """A benchmark prompt as a chat user message: an Alpaca layout's instruction (and input)
  without the preamble and headers (the server applies its own template), else as it is."""
  from data_prep.alignment_examples import user_turn
  m = _ALPACA.search(prompt)
  return prompt if m is None else user_turn(m.group(1), m.group(2))


class ServedUnavailable(RuntimeError):
  """The endpoint kept failing for the whole retry budget, or refused a request."""


def spec_of(cfg) -> str:
  return f"{SPEC_PREFIX}{cfg.model}@{cfg.base_url}"


class ServedSystem:

  def __init__(self, name: str, cfg):
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    self.name = name
    self.base_url, self.model = get("base_url", ""), get("model", "")
    if not self.base_url or not self.model:
      raise ValueError(f"config.served.{name}: needs base_url and model")
    env = get("api_key_env", "OPENAI_API_KEY")
    key = os.environ.get(env) if env else None
    if not key:
      raise ValueError(f"config.served.{name}: environment variable {env!r} (api_key_env) is "
                       f"not set (a local server without auth accepts any value, e.g. export "
                       f"{env}=none)")
    self.spec = spec_of(cfg)
    self.concurrency = int(get("concurrency", 8))
    self.retry_budget_s = float(get("retry_budget_s", 300.0))
    self.backoff_s, self.backoff_max_s = float(get("backoff_s", 1.0)), float(get("backoff_max_s",
                                                                                    30.0))
    self._retry = RetryBudget(self.retry_budget_s, self.backoff_s, self.backoff_max_s)
    self.client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                                timeout=float(get("timeout_s", 120.0)))
    self.counters = collections.Counter()
    self._lock = threading.Lock()
    self._mc: tuple[bool, str] | None = None

  def _count(self, key: str) -> None:
    with self._lock:
      self.counters[key] += 1

  def _post(self, path: str, body: dict) -> dict:
    def refused(e):
      return ServedUnavailable(f"served system {self.name} ({self.base_url}, model "
                               f"{self.model!r}) refused a request: HTTP "
                               f"{getattr(e, 'status_code', '?')}: {e.message}")

    def gave_up(spent, retries, kind, e):
      self._count("retries")  # the failure that spent the budget is counted as one too
      return ServedUnavailable(f"served system {self.name} ({self.base_url}) kept failing for "
                               f"{spent:.0f} s (last error: {kind}: {e.message})")

    out = self._retry.call(lambda: self.client.post(path, body=body, cast_to=object),
                           errors=(openai.APIError,), transient=transient_error,
                           refused=refused, gave_up=gave_up,
                           on_retry=lambda kind: self._count("retries"))
    self._count("calls")
    return out

  def _map(self, fn, jobs) -> list:
    if not jobs:
      return []
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      return list(pool.map(fn, jobs))

  def answer(self, questions, positions, *, max_tokens: int, temperature: float, top_p: float,
             seed: int) -> list[dict]:
    """[{"answer", "n_tokens", "undecodable"}] per question (the records' answer fields)."""
    def one(job):
      q, pos = job
      resp = self._post("/chat/completions", {
          "model": self.model, "messages": [{"role": "user", "content": q}],
          "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
          "seed": (seed * 1_000_003 + pos) % 2**32})
      text = (resp["choices"][0].get("message") or {}).get("content") or ""
      n = int((resp.get("usage") or {}).get("completion_tokens") or 0)
      return {"answer": text.strip(), "n_tokens": n, "undecodable": 0}
    return self._map(one, list(zip(questions, positions)))

  def _echo(self, text: str) -> dict | None:
    """The completions API's prompt logprobs for `text`: {tokens, token_logprobs, text_offset},
    or None when the server gives none."""
    try:
      resp = self._post("/completions", {"model": self.model, "prompt": text, "echo": True,
                                         "logprobs": 1, "max_tokens": 1, "temperature": 0.0})
    except ServedUnavailable as e:
      if "refused" in str(e):
        return None
      raise
    lp = (resp.get("choices") or [{}])[0].get("logprobs") or {}
    tokens, values, offsets = (lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset"))
    if not tokens or not values or not offsets or len(tokens) < 2 or len(offsets) != len(tokens):
      return None
    return {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}

  def mc_support(self) -> tuple[bool, str]:
    """(whether MC tasks can be scored, why), asked of the server once."""
    if self._mc is None:
      probe = "The capital of France is Paris"
      got = self._echo(probe)
      if got is None:
        self._mc = (False, f"served system {self.name}: multiple-choice scoring needs the "
                    "log-likelihood of given answers, and the endpoint returns no prompt "
                    "logprobs (completions with echo + logprobs)")
      elif sum(v is not None for v in got["token_logprobs"]) < 1 or \
          max(got["text_offset"]) >= len(probe) + 16:
        self._mc = (False, f"served system {self.name}: the endpoint's echoed logprobs do not "
                    "cover the prompt")
      else:
        self._mc = (True, "prompt logprobs via completions echo")
    return self._mc

  def score(self, items) -> list[dict]:
    """MC items -> [{"logp_sum": [C], "n_tokens": [C]}] from echoed prompt logprobs."""
    jobs = [(it.context, c) for it in items for c in it.choices]

    def one(job):
      context, choice = job
      got = self._echo(context + choice)
      if got is None:
        raise ServedUnavailable(f"served system {self.name}: no prompt logprobs for an item")
      # The choice's tokens: those starting at or after the context's end and inside the
      # prompt (the generated token after the echo starts at its end).
      cut, end = len(context), len(context) + len(choice)
      picked = [v for off, v in zip(got["text_offset"], got["token_logprobs"])
                if cut <= off < end and v is not None]
      return float(np.sum(picked)) if picked else -np.inf, len(picked)

    flat = self._map(one, jobs)
    out, k = [], 0
    for it in items:
      part = flat[k:k + len(it.choices)]
      k += len(it.choices)
      out.append({"logp_sum": [s for s, _ in part], "n_tokens": [n for _, n in part]})
    return out
