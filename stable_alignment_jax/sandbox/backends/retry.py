"""A time budget for retrying a failing endpoint, shared by the sandbox's OpenAI backend (async)
and eval's served systems and judge (threads).

An outage is budgeted in wall-clock time, not in attempts: a server restart costs minutes, not
the run. The clock starts at the first failure of the current outage and is shared by every
call through the same budget (any success ends the outage), or, with `per_call`, runs from
that call's own start (the judge). Between attempts the caller waits an exponential backoff,
jittered so that concurrent callers do not retry in step.

`call` (threads) and `acall` (asyncio) own the loop; the caller says which errors are worth a
retry and what to raise when one is not or when the budget is spent, and counts what it likes.
"""

import asyncio
import random
import threading
import time
from typing import Awaitable, Callable


class RetryBudget:
  """`budget_s` of continuous failure; `max_retries` >= 0 also caps one call's retries (older
  configs; -1: no cap). After attempt n (from 0) fails, the wait is
  uniform(*jitter) * min(backoff_max_s, backoff_s * 2**n)."""

  def __init__(self, budget_s: float, backoff_s: float, backoff_max_s: float, *,
               max_retries: int = -1, jitter: tuple[float, float] = (0.0, 1.0),
               clock=time.monotonic, rng: random.Random | None = None):
    self.budget_s, self.max_retries = float(budget_s), int(max_retries)
    self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
    self.jitter = jitter
    self._clock = clock
    self._rng = rng or random.Random()  # spaces retries only; it never touches a result
    self._lock = threading.Lock()
    self._down_since: float | None = None  # first failure of the current shared outage

  def now(self) -> float:
    """The budget's clock: what a per-call `started` is read from."""
    return self._clock()

  def succeeded(self) -> None:
    """An attempt went through: the shared outage, if any, is over."""
    with self._lock:
      self._down_since = None

  def failed(self, attempt: int, started: float | None = None) -> tuple[float, float | None]:
    """After attempt `attempt` (from 0) failed: (seconds the outage has lasted, seconds to wait
    before the next attempt, or None when the budget is spent and the caller gives up).
    `started`: the clock reading at the call's own start, for a per-call budget."""
    with self._lock:
      now = self._clock()
      if started is None:
        if self._down_since is None:
          self._down_since = now
        started = self._down_since
      spent = now - started
      if spent >= self.budget_s or 0 <= self.max_retries <= attempt:
        return spent, None
      lo, hi = self.jitter
      return spent, self._rng.uniform(lo, hi) * min(self.backoff_max_s,
                                                    self.backoff_s * 2 ** attempt)

  def call(self, fn: Callable, *, errors: tuple, transient: Callable, refused: Callable,
           gave_up: Callable, on_retry: Callable | None = None, per_call: bool = False):
    """fn() until it returns, on this thread. An exception of `errors` goes to transient(e): a
    short kind ("429", "5xx", ...) retries it, None raises refused(e) instead. Each retry calls
    on_retry(kind) and then sleeps; when the budget is spent, gave_up(spent_s, retries, kind, e)
    is raised. Other exceptions propagate at once."""
    attempt, started = 0, (self.now() if per_call else None)
    while True:
      try:
        out = fn()
      except errors as e:
        wait_s = self._after(e, attempt, started, transient, refused, gave_up, on_retry)
      else:
        self.succeeded()
        return out
      time.sleep(wait_s)
      attempt += 1

  async def acall(self, fn: Callable[[], Awaitable], *, errors: tuple, transient: Callable,
                  refused: Callable, gave_up: Callable, on_retry: Callable | None = None,
                  per_call: bool = False):
    """`call` for a coroutine function, waiting with asyncio.sleep."""
    attempt, started = 0, (self.now() if per_call else None)
    while True:
      try:
        out = await fn()
      except errors as e:
        wait_s = self._after(e, attempt, started, transient, refused, gave_up, on_retry)
      else:
        self.succeeded()
        return out
      await asyncio.sleep(wait_s)
      attempt += 1

  def _after(self, e, attempt, started, transient, refused, gave_up, on_retry) -> float:
    """The wait after attempt `attempt` failed with `e`, or the exception to raise instead."""
    kind = transient(e)
    if kind is None:
      raise refused(e) from None
    spent, wait_s = self.failed(attempt, started)
    if wait_s is None:
      raise gave_up(spent, attempt, kind, e) from None
    if on_retry is not None:
      on_retry(kind)
    return wait_s
