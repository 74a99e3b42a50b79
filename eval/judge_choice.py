"""The judge's 1-10 rating read as a verified choice, by SANDBOX's mechanism
(stable_alignment_jax/sandbox/backends/choice_reading.py).

The rubric asks for a reason, then a final "Rating: N" line. The judge's text reply is written
as before; then, where the server verifiably continues a final assistant message (probed once per
judge model), the reply is continued from its reason followed by "Rating:" (the reason up to its
rating line, or the whole reply when it wrote none), and the rating is the most likely of
"1".."10" as the next token(s): "10" is one token in some vocabularies and "1" then "0" in
others, so the mass of "1" is split by the probability that "0" follows "Rating: 1". A judge
reply without a rating line is then still rated, from the judge's own next-token scores; a
server that cannot be verified leaves the strict text reading alone (and `reading` says why).
"""

import asyncio
import math
import re
import threading

import ml_collections
import numpy as np

from stable_alignment_jax.sandbox.backends import Request
from stable_alignment_jax.sandbox.backends.openai_backend import OpenAIBackend

SCALE = tuple(str(v) for v in range(1, 11))
_RATING_LINE = re.compile(r"^\s*\**rating\**\s*:.*$", re.IGNORECASE | re.MULTILINE)


def reason_prefix(reply: str) -> str:
  """The reply up to its (last) rating line, then "Rating:": where the score is read."""
  lines = list(_RATING_LINE.finditer(reply or ""))
  head = (reply[:lines[-1].start()] if lines else (reply or "").rstrip() + "\n")
  return head + "Rating:"


def ten_point(direct: list[float] | None, p_zero_after_one: float | None) -> dict | None:
  """Next-token log-probs of "1".."10" (direct, "10" as one token where the vocabulary has it)
  and p("0" | "Rating: 1") -> {value, probs (over 1..10), expected}; None when none scored."""
  if direct is None:
    return None
  p = np.exp(np.asarray(direct, np.float64))
  if p_zero_after_one:  # "1" may be the first token of "10"
    p[9] += p[0] * p_zero_after_one
    p[0] *= 1.0 - p_zero_after_one
  if not p.sum():
    return None
  p /= p.sum()
  return {"value": int(np.argmax(p)) + 1, "probs": [float(x) for x in p],
          "expected": float(p @ np.arange(1, 11))}


class ChoiceReader:
  """Reads judge ratings as choices over an OpenAI-compatible endpoint (its own event loop in a
  thread-safe wrapper: the judge calls from worker threads)."""

  def __init__(self, base_url: str, model: str, api_key_env: str, *, concurrency: int = 8,
               timeout_s: float = 60.0, tokenizer: str = "", retry_budget_s: float = 300.0):
    self.model = model
    self.backend = OpenAIBackend("judge", ml_collections.ConfigDict(dict(
        kind="openai", base_url=base_url, api="chat", api_key_env=api_key_env,
        concurrency=concurrency, timeout_s=timeout_s, retry_budget_s=retry_budget_s,
        max_retries=-1, backoff_s=0.5, backoff_max_s=30.0, top_logprobs=20,
        tokenizer=tokenizer)))
    self.loop = asyncio.new_event_loop()
    self._lock = threading.Lock()
    self.reading = None

  def _run(self, coro):
    with self._lock:
      return self.loop.run_until_complete(coro)

  def verified(self) -> bool:
    if self.reading is None:
      self.reading = self._run(self.backend.probe([self.model]))[self.model]
    return self.reading.verified

  def read(self, prompts: list[str], replies: list[str]) -> list[dict | None]:
    """One reading per (rubric prompt, text reply); None where the server scored no choice."""
    if not prompts or not self.verified():
      return [None] * len(prompts)
    req = lambda p, prefix, choices: Request("judge", self.model, p, 1, 0.0, 1.0, 0,
                                             prefix=prefix, choices=choices)
    prefixes = [reason_prefix(r) for r in replies]
    direct = self._run(self.backend.choose([req(p, x, SCALE) for p, x in zip(prompts,
                                                                               prefixes)]))
    ones = [i for i, d in enumerate(direct) if d is not None and math.isfinite(d[0])
            and math.exp(d[0]) >= 1e-3]
    zero = self._run(self.backend.choose([req(prompts[i], prefixes[i] + " 1", ("0",))
                                          for i in ones])) if ones else []
    p0 = {i: math.exp(z[0]) if z is not None else 0.0 for i, z in zip(ones, zero)}
    return [ten_point(d, p0.get(i)) for i, d in enumerate(direct)]

  def close(self):
    self._run(self.backend.aclose())
    self.loop.close()
