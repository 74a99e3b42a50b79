"""What every benchmark here shares: the machine's load around the run, sides timed in
alternation, minimum and median of each, and a contamination flag.

The machine is shared. Load only ever adds time, and torch's threads suffer from it far more
than XLA's, so a ratio taken under load flatters whichever side degrades less. A run still
prints its headline but is flagged, its figures not to be quoted, when the load average (1
minute) was above `CONTAMINATED` as it started, or when the other processes' CPU time during it
averaged more than `CONTAMINATED` cores. (The load average during and after a run counts the
benchmark's own threads: a 2-thread benchmark on 2 cores drives it to 2 by itself, so it is
printed, not judged; /proc/stat's busy time minus this process's own CPU time is what the others
took.)

  with Run("train_step") as run:        # prints the load before; after, and the flag, on exit
    times = alternate({"jax": f, "torch": g}, reps=5)
    run.row("jax step s", summary(times["jax"]))
"""

import json
import os
import statistics
import time
from typing import Callable

CONTAMINATED = 1.0  # load average above which a run's figures are flagged
QUIET = 0.5  # load average below which a figure may be quoted


def load() -> float:
  return os.getloadavg()[0]


def load_text(la=None) -> str:
  one, five, fifteen = la or os.getloadavg()
  return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def timed(fn: Callable):
  """(seconds, result) of one call."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def alternate(sides: dict[str, Callable], reps: int, *, flip: bool = True
              ) -> dict[str, list[float]]:
  """Seconds of `reps` calls of each side, the sides interleaved (a, b, b, a, a, b, ...: with
  `flip` each round reverses the order, so neither side always runs right after the other), so
  a change in load hits every side alike."""
  names = list(sides)
  out = {n: [] for n in names}
  for r in range(reps):
    for n in (names[::-1] if flip and r % 2 else names):
      out[n].append(timed(sides[n])[0])
  return out


def stats(xs: list[float]) -> dict[str, float]:
  return {"min": min(xs), "median": statistics.median(xs), "n": len(xs)}


def summary(xs: list[float], unit: str = "s", scale: float = 1.0) -> str:
  s = stats(xs)
  return (f"min {s['min'] * scale:.4g} {unit}  median {s['median'] * scale:.4g} {unit}  "
          f"(n={s['n']}; all {', '.join(f'{x * scale:.3g}' for x in xs)})")


def sanity(name: str, measured_s: float, independent_s: float, *, tolerance: float = 2.0
           ) -> tuple[bool, str]:
  """Is a baseline's measured time within `tolerance`x of an independent estimate made in the
  same process (e.g. its per-token forward time x tokens)? A baseline far slower than its own
  parts is sick (wrong threads, no cache, a slow path) and a win over it means nothing."""
  ratio = measured_s / independent_s
  ok = 1 / tolerance <= ratio <= tolerance
  return ok, (f"{name}: measured {measured_s:.4g} s vs independent estimate {independent_s:.4g} s "
              f"= {ratio:.2f}x ({'ok' if ok else 'SUSPECT baseline'}, tolerance {tolerance}x)")


def hf_generate_parts_s(model, ids, new: int, sync: Callable = lambda: None) -> float:
  """An independent figure for HF `generate` of `new` tokens on the batch `ids`: its own parts
  timed alone, one prefill and then cached one-token forwards (16 timed, scaled to `new`).
  `sync` waits for the device (e.g. torch.cuda.synchronize)."""
  import torch
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync()
    prefill = time.perf_counter() - t0
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = min(new, 16)
    t0 = time.perf_counter()
    for _ in range(steps):
      out = model(input_ids=tok, past_key_values=past, use_cache=True)
      past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
  return prefill + new * (time.perf_counter() - t0) / steps


def busy_s() -> float:
  """CPU seconds every process of the machine has used since boot (Linux; 0.0 elsewhere)."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return 0.0
  idle = ticks[3] + ticks[4]  # idle + iowait
  return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def own_s() -> float:
  """CPU seconds of this process and of its children it has waited for."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Run:
  """A benchmark run: load before and after, rows of figures, a flag when contaminated, and
  optionally the rows as JSON."""

  def __init__(self, name: str, json_path: str = ""):
    self.name, self.json_path = name, json_path
    self.rows: list[tuple[str, str]] = []
    self.data: dict = {"benchmark": name}
    self.loads: list[float] = []
    self.checks: list[bool] = []
    self.contaminated = False

  def _sample(self, what: str) -> tuple:
    la = os.getloadavg()
    self.loads.append(la[0])
    print(f"[{self.name}] {what}: {load_text(la)}", flush=True)
    return la

  def __enter__(self):
    self.data["load_before"] = self._sample("before")
    self._clock = (time.perf_counter(), busy_s(), own_s())
    return self

  def others_cores(self) -> float:
    """Cores the other processes kept busy on average since the run began."""
    t0, busy0, own0 = self._clock
    wall = max(time.perf_counter() - t0, 1e-9)
    return max(0.0, (busy_s() - busy0) - (own_s() - own0)) / wall

  def mark(self, what: str) -> float:
    """Record the load at a point inside the run (counted for the flag)."""
    return self._sample(what)[0]

  def row(self, key: str, value: str) -> None:
    self.rows.append((key, value))

  def check(self, ok: bool, text: str) -> None:
    self.checks.append(ok)
    self.row("baseline check", text)

  def __exit__(self, *exc):
    others = self.others_cores()
    la = os.getloadavg()
    self.loads.append(la[0])
    self.data["load_after"] = la
    width = max((len(k) for k, _ in self.rows), default=0)
    for k, v in self.rows:
      print(f"{k:<{width}}  {v}")
    before, peak = self.loads[0], max(self.loads)
    worst = max(before, others)
    self.contaminated = worst > CONTAMINATED
    seen = (f"load before {before:.2f}, other processes {others:.2f} cores during the run, "
            f"load peak {peak:.2f} incl. this run")
    verdict = (f"CONTAMINATED ({seen}; limit {CONTAMINATED}): do not quote" if self.contaminated
               else f"quiet ({seen})" if worst < QUIET else
               f"usable, not quiet ({seen}; quote only below {QUIET})")
    if self.checks and not all(self.checks):
      verdict += "; a baseline failed its check: its ratio is not a win"
    print(f"[{self.name}] after: {load_text(la)} -> {verdict}", flush=True)
    self.data.update(rows=dict(self.rows), contaminated=self.contaminated, peak_load=peak,
                     others_cores=others, baseline_ok=all(self.checks), verdict=verdict)
    if self.json_path:
      with open(self.json_path, "w") as f:
        json.dump(self.data, f, indent=2, default=float)
    return False


def torch_threads(torch) -> int:
  """torch's threads = the machine's cores, as its users run it."""
  torch.set_num_threads(os.cpu_count() or 1)
  return torch.get_num_threads()


def one_cpu_device() -> None:
  """One CPU device: drop a forced device count (the tests set one) before jax is imported."""
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
