"""RetryBudget (sandbox/backends/retry.py): when a failing endpoint is given up on and how long
each wait is, on a fake clock, against the rule computed by hand."""

import asyncio
import random

import pytest

from stable_alignment_jax.sandbox.backends.retry import RetryBudget


class Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_a_shared_outage_runs_from_its_first_failure_until_a_success():
  clock = Clock()
  b = RetryBudget(10.0, 0.5, 4.0, clock=clock, rng=random.Random(0))
  ref = random.Random(0)
  # Waits: uniform(0, 1) * min(4, 0.5 * 2**n), the rng drawn once per wait.
  assert b.failed(0) == (0.0, ref.uniform(0, 1) * 0.5)
  clock.t += 3
  assert b.failed(1) == (3.0, ref.uniform(0, 1) * 1.0)
  clock.t += 4
  assert b.failed(4) == (7.0, ref.uniform(0, 1) * 4.0)  # capped at backoff_max_s
  # Another call failing in the same outage shares its clock.
  assert b.failed(0) == (7.0, ref.uniform(0, 1) * 0.5)
  clock.t += 3
  assert b.failed(5) == (10.0, None)  # the budget is spent: give up, no draw
  b.succeeded()  # the outage is over; the next failure starts a new one
  clock.t += 50
  assert b.failed(0) == (0.0, ref.uniform(0, 1) * 0.5)


def test_a_per_call_clock_jitter_and_a_retry_cap():
  clock = Clock()
  b = RetryBudget(5.0, 1.0, 30.0, max_retries=2, jitter=(0.5, 1.0), clock=clock,
                  rng=random.Random(1))
  ref = random.Random(1)
  t0 = b.now()
  clock.t += 1
  assert b.failed(0, started=t0) == (1.0, ref.uniform(0.5, 1.0) * 1.0)
  assert b.failed(1, started=t0) == (1.0, ref.uniform(0.5, 1.0) * 2.0)
  assert b.failed(2, started=t0) == (1.0, None)  # max_retries reached before the budget
  # A per-call clock leaves the shared one alone: a call starting now has its own budget.
  clock.t += 10
  assert b.failed(0, started=t0)[1] is None
  assert b.failed(0, started=b.now())[1] is not None
  # Without a cap (-1) only the time budget stops the retries.
  u = RetryBudget(5.0, 1.0, 30.0, max_retries=-1, clock=clock)
  assert u.failed(1000)[1] is not None


def test_waits_stay_within_the_jittered_backoff():
  b = RetryBudget(1e9, 0.25, 2.0, jitter=(0.5, 1.0))
  for n in range(8):
    cap = min(2.0, 0.25 * 2 ** n)
    waits = [b.failed(n)[1] for _ in range(50)]
    assert all(0.5 * cap <= w <= cap for w in waits) and len(set(waits)) > 1


class Flaky(Exception):
  def __init__(self, kind):
    super().__init__(kind)
    self.kind = kind


class Refused(Exception):
  pass


class GaveUp(Exception):
  pass


def _script(clock, outcomes, step_s=1.0):
  """fn() replaying `outcomes` (an exception kind or a value), the clock advancing each call."""
  calls = []

  def fn():
    calls.append(clock.t)
    clock.t += step_s
    out = outcomes[len(calls) - 1]
    if isinstance(out, str) and out.startswith("!"):
      raise Flaky(out[1:])
    return out
  return fn, calls


def _hooks(log):
  return dict(errors=(Flaky,), transient=lambda e: None if e.kind == "400" else e.kind,
              refused=lambda e: Refused(e.kind),
              gave_up=lambda spent, n, kind, e: GaveUp((spent, n, kind)),
              on_retry=lambda kind: log.append(kind))


def test_call_retries_transient_errors_refuses_others_and_gives_up_on_time():
  clock, log = Clock(), []
  b = RetryBudget(3.5, 1e-4, 1e-4, clock=clock)
  fn, calls = _script(clock, ["!429", "!5xx", "ok"])
  assert b.call(fn, **_hooks(log)) == "ok" and len(calls) == 3 and log == ["429", "5xx"]
  fn, calls = _script(clock, ["!5xx", "!400", "never"])
  with pytest.raises(Refused, match="400"):
    b.call(fn, **_hooks(log))
  assert len(calls) == 2
  # The outage began at the 5xx above (no success since): 1 s spent there, then 1 s per call.
  fn, calls = _script(clock, ["!timeout"] * 9)
  with pytest.raises(GaveUp) as e:
    b.call(fn, **_hooks(log))
  assert e.value.args[0] == (4.0, 2, "timeout") and len(calls) == 3
  # A success ends the outage; a per-call budget starts at the call itself.
  fn, _ = _script(clock, ["ok"])
  b.call(fn, **_hooks(log))
  fn, calls = _script(clock, ["!timeout"] * 9)
  with pytest.raises(GaveUp) as e:
    b.call(fn, **_hooks(log), per_call=True)
  assert e.value.args[0] == (4.0, 3, "timeout") and len(calls) == 4
  # Other exceptions are not the budget's business.
  with pytest.raises(KeyError):
    b.call(lambda: {}["x"], **_hooks(log))


def test_acall_is_the_same_loop_for_coroutines():
  clock, log = Clock(), []
  b = RetryBudget(10.0, 1e-4, 1e-4, max_retries=1, clock=clock)
  fn, calls = _script(clock, ["!429", "ok"])

  async def afn():
    return fn()
  assert asyncio.run(b.acall(afn, **_hooks(log))) == "ok" and log == ["429"]
  fn, calls = _script(clock, ["!429", "!429", "!429"])
  with pytest.raises(GaveUp) as e:
    asyncio.run(b.acall(afn, **_hooks(log)))
  assert e.value.args[0][1:] == (1, "429") and len(calls) == 2  # max_retries=1
