"""A time budget for retrying a failing endpoint, shared by the sandbox's OpenAI backend (async)
and eval's served systems and judge (threads).

An outage is budgeted in wall-clock time, not in attempts: a server restart costs minutes, not
the run. The clock starts at the first failure of the current outage and is shared by every
call through the same budget (any success ends the outage), or, given `started`, runs from
that call's own start (the judge). Between attempts the caller waits an exponential backoff,
jittered so that concurrent callers do not retry in step. The caller owns the loop, the error
classification, the counters and the sleeping (time.sleep or asyncio.sleep); this owns when to
give up and how long to wait.
"""

import random
import threading
import time


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
