"""Dynamic batching: requests that arrive together share one sampler call.

A single worker thread owns the `TextSampler` (JAX releases the GIL while it computes, so the
asyncio event loop keeps accepting requests meanwhile). When a job arrives the worker waits up to
`wait_ms` for more, then runs everything collected, up to `max_batch` rows, in one call. Jobs
that pile up while a call runs form the next batch, so under load batching needs no waiting.

Each row keeps its own SamplingParams (the sampler supports that), and rows stop independently,
so a batch's results equal what each job would get alone. A batch with a streamed job in it is
decoded with `TextSampler.stream_rows`: every `chunk` decode steps the streamed jobs get their
rows' new text (through their `on_delta` callback, in the worker thread), and every job gets its
Completions when the batch ends; a batch of only non-streamed jobs is one `complete_rows`.
Two things are kept apart:
- the sampler rounds prompt length and new-token count up to powers of two, and a batch uses the
  largest of each, so a long-prompt job and a long-answer job can each fit the context alone but
  not together: such a job waits for the next batch (FIFO order is kept);
- if a batched call fails anyway, each job is retried alone, so one bad job fails only itself
  (a streamed job that has already sent text fails instead: it cannot take its text back).
"""

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

from stable_alignment_jax.contracts import bucket
from stable_alignment_jax.sampling.text_sampler import Completion, Delta, Row, TextSampler


@dataclasses.dataclass
class _Job:
  rows: list[Row]
  future: concurrent.futures.Future  # -> list[Completion]
  on_delta: Callable[[int, Delta], None] | None = None  # streamed: (row, delta) as decoded
  sent: bool = False  # a streamed job has sent text


class Batcher:

  def __init__(self, sampler: TextSampler, *, max_batch: int = 32, wait_ms: float = 10.0,
               chunk: int = 8):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self.sampler, self.max_batch, self.wait = sampler, max_batch, wait_ms / 1000.0
    self.chunk = chunk  # decode steps between a streamed job's deltas
    self._queue: collections.deque[_Job] = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.batches = 0  # batches run (a batch larger than max_batch rows is one job in chunks)
    self.rows = 0  # rows generated

  # -- lifecycle ---------------------------------------------------------------------------------
  def start(self) -> "Batcher":
    if self._thread is None:
      self._stopping = False
      self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
      self._thread.start()
    return self

  def stop(self, timeout: float | None = 30.0):
    with self._cv:
      self._stopping = True
      self._cv.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None

  # -- submitting --------------------------------------------------------------------------------
  def submit(self, rows: Sequence[Row], on_delta: Callable[[int, Delta], None] | None = None
             ) -> concurrent.futures.Future:
    """A future of the Completions of `rows`; with `on_delta` the job is streamed: it is called
    (in the worker thread) with (row index, Delta) whenever a row has new text or finishes."""
    job = _Job(list(rows), concurrent.futures.Future(), on_delta)
    with self._cv:
      if self._stopping or self._thread is None:
        raise RuntimeError("batcher is not running")
      self._queue.append(job)
      self._cv.notify_all()
    return job.future

  # -- worker ------------------------------------------------------------------------------------
  def _fits(self, jobs: Sequence[_Job]) -> bool:
    p = bucket(max(len(r.ids) for j in jobs for r in j.rows), self.sampler.sampler.min_prompt)
    new = bucket(max(r.params.max_new_tokens for j in jobs for r in j.rows), 1)
    return p + new <= self.sampler.context

  def _collect(self) -> list[_Job]:
    """Blocks for the first job, then gathers more for up to `wait` seconds."""
    with self._cv:
      while not self._queue and not self._stopping:
        self._cv.wait()
      batch, rows = [], 0
      deadline = time.monotonic() + self.wait
      while True:
        while self._queue:
          job = self._queue[0]
          if batch and (rows + len(job.rows) > self.max_batch or not self._fits(batch + [job])):
            return batch  # it leads the next batch
          self._queue.popleft()
          if not job.future.set_running_or_notify_cancel():
            continue  # the client went away before we started
          batch.append(job)
          rows += len(job.rows)
          if rows >= self.max_batch:
            return batch
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._stopping or not batch:
          return batch
        self._cv.wait(remaining)

  def _generate(self, jobs: Sequence[_Job]) -> list[Completion]:
    rows = [r for j in jobs for r in j.rows]
    owner = [(j, k) for j in jobs for k in range(len(j.rows))]
    out = []
    for s in range(0, len(rows), self.max_batch):  # a job may hold more rows than max_batch
      part = rows[s:s + self.max_batch]
      if not any(j.on_delta for j, _ in owner[s:s + self.max_batch]):
        out += self.sampler.complete_rows(part)
      else:
        done: list[Completion | None] = [None] * len(part)
        for deltas in self.sampler.stream_rows(part, self.chunk):
          for i, d in enumerate(deltas):
            job, k = owner[s + i]
            if d.done is not None:
              done[i] = d.done
            if job.on_delta is not None and (d.text or d.done is not None):
              job.sent = job.sent or bool(d.text)
              job.on_delta(k, d)
        out += done
      self.batches += 1
    self.rows += len(rows)
    return out

  def _run(self, batch: list[_Job]):
    try:
      out = self._generate(batch)
    except Exception as e:  # noqa: BLE001 -- handed to the waiting requests
      if len(batch) == 1:
        batch[0].future.set_exception(e)
        return
      logging.warning("batched generate failed (%s); retrying its %d jobs one by one", e,
                      len(batch))
      for job in batch:
        if job.sent:
          job.future.set_exception(e)
          continue
        try:
          job.future.set_result(self._generate([job]))
        except Exception as e1:  # noqa: BLE001
          job.future.set_exception(e1)
      return
    start = 0
    for job in batch:
      job.future.set_result(out[start:start + len(job.rows)])
      start += len(job.rows)

  def _loop(self):
    while True:
      batch = self._collect()
      if not batch:
        if self._stopping:
          return
        continue
      self._run(batch)
