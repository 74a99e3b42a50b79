"""SANDBOX speed: (a) the JAX backend's overhead over bare batched generation, (b) HTTP concurrency.

(a) One Back-Scatter round of a 64-agent society (grid 10x10, 4 peers) with the in-process JAX
    backend and a random tiny model. Every `Sampler.generate` batch the round issues is recorded;
    the same batches are then re-issued straight to the sampler. Ratio = round wall time / bare
    generate time (target <= 1.5). A warm-up round compiles every shape first; the round and the
    bare batches are timed in alternation and the fastest of each is kept.
(b) A 16-agent round against an OpenAI-compatible server (tests/sandbox_server.py, its own
    process) that sleeps 200 ms per call: wall time at concurrency 1 over concurrency 16
    (target >= 12x), the two alternated; the client's CPU per call beside it, and the OpenAI
    backend's own CPU per call measured alone (no society around it, a server that answers at
    once). The baseline (concurrency 1) is checked against its floor, calls x 200 ms.
(c) configs/sandbox.py:tiny, 9 agents, one round: batch buckets sized from the phases vs every
    phase padded to 64 rows (its earlier `min_batch=64`), alternated; rows padded per round.
The load average is printed before, between and after (benchmarks/common.py).

  python benchmarks/sandbox.py [--agents 64] [--reps 2] [--http_agents 16] [--skip jax,buckets,http]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/, benchmarks/
sys.path.insert(0, os.path.join(ROOT, "tests"))  # sandbox_server (the test server)

from benchmarks import common  # noqa: E402

common.one_cpu_device()  # before jax is imported

import ml_collections  # noqa: E402

from configs import sandbox as sandbox_config  # noqa: E402
from stable_alignment_jax.sandbox import runner  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
QUESTIONS = os.path.join(SHARED, "sandbox_questions", "hh_questions.txt")
PRIORS = os.path.join(SHARED, "hh_rlhf", "harmless-base_test.jsonl.gz")


def _society(store: str, n_agents: int):
  c = sandbox_config.get_config(f"tiny,agents={n_agents},rounds=1")
  c.store = store
  c.world.grid_size = 10  # the paper's grid
  c.world.question_file, c.world.prior_file = QUESTIONS, PRIORS
  return c


def bench_jax(n_agents: int, reps: int, tmp: str) -> dict:
  cfg = _society(os.path.join(tmp, "warm.sqlite"), n_agents)
  # configs/sandbox.py sizes the batch buckets from the phases of this society, as in a real run
  backends = runner.make_backends(cfg)
  local = backends["local"]
  (model,) = local.models.values()
  sampler = model.sampler
  bare_generate = sampler.generate
  batches = []

  inside = []  # generate seconds inside each measured round

  def recording(prompts, params):
    batches.append((prompts, params))
    t0 = time.perf_counter()
    out = bare_generate(prompts, params)
    inside[-1] += time.perf_counter() - t0
    return out

  sampler.generate = recording  # this instance only: every batch the round issues is kept
  inside.append(0.0)
  runner.start(cfg, progress=False, backends=backends)  # warm-up: compiles every shape
  rounds, bares, steps = [], [], []
  for rep in range(reps):
    batches.clear()
    inside.append(0.0)
    cfg.store = os.path.join(tmp, f"round{rep}.sqlite")  # a fresh store: no cached calls
    runner.start(cfg, progress=False, backends=backends, max_steps=0)  # setup only
    t0 = time.perf_counter()
    runner.resume(cfg.store, progress=False, backends=backends)
    rounds.append(time.perf_counter() - t0)
    s = Store(cfg.store)
    steps.append(sum(w for _, _, w, _ in s.step_rows()))
    n_calls = s.count("calls")
    s.close()
    t0 = time.perf_counter()
    for prompts, params in batches:
      bare_generate(prompts, params)
    bares.append(time.perf_counter() - t0)
  sampler.generate = bare_generate
  return {"agents": n_agents, "calls": n_calls, "generate_batches": len(batches),
          "batch_rows": [len(p) for p, _ in batches], "resume_s": min(rounds),
          "step_s": min(steps), "bare_generate_s": min(bares),
          "ratio": min(steps) / min(bares), "all_step_s": steps, "all_bare_s": bares,
          # Same-round view, immune to load drift between the two timings: the round's wall
          # over the generate time spent inside it.
          "pairwise": [w / b for w, b in zip(steps, bares)], "inside_s": inside[1:], "inside_ratio": min(w / g for w, g in zip(steps, inside[1:]))}


def bench_buckets(reps: int, tmp: str) -> dict:
  """configs/sandbox.py:tiny (9 agents) one round, its batch buckets sized from the phases vs
  every phase padded to 64 rows (`min_batch=64`, as it was): wall per round after a warm-up
  round (the compiles) and the rows the batches were padded to."""
  sides = {}
  for name, (min_batch, buckets) in {"phase buckets": (1, None), "min_batch=64": (64, [])}.items():
    cfg = sandbox_config.get_config("tiny,rounds=1")
    cfg.world.question_file, cfg.world.prior_file = QUESTIONS, PRIORS
    cfg.backends.local.min_batch = min_batch
    if buckets is not None:
      cfg.backends.local.batch_buckets = buckets
    cfg.store = os.path.join(tmp, f"bk_{min_batch}_warm.sqlite")
    backends = runner.make_backends(cfg)
    t0 = time.perf_counter()
    runner.start(cfg, progress=False, backends=backends)
    sides[name] = {"cfg": cfg, "backends": backends, "first_s": time.perf_counter() - t0,
                   "buckets": list(cfg.backends.local.batch_buckets), "rows": []}

  def one_round(name):
    def go():
      side = sides[name]
      counters = side["backends"]["local"].counters
      before = counters["batch_rows"], counters["calls"]
      side["cfg"].store = os.path.join(tmp, f"bk_{name[:5]}_{len(side['rows'])}.sqlite")
      runner.start(side["cfg"], progress=False, backends=side["backends"])
      side["rows"].append((counters["batch_rows"] - before[0], counters["calls"] - before[1]))
    return go

  times = common.alternate({n: one_round(n) for n in sides}, reps)
  return {n: {"times": times[n], "first_s": v["first_s"], "buckets": v["buckets"],
              "padded_rows": v["rows"][-1][0], "rows": v["rows"][-1][1]}
          for n, v in sides.items()}


def _cpu(pid: int) -> float:
  """User + system CPU seconds of a process (Linux /proc; clock ticks)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(delay: float):
  """tests/sandbox_server.py in its own process (so its CPU is not the client's); its URL."""
  import urllib.request
  port = _free_port()
  server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "sandbox_server.py"),
                             f"--port={port}", f"--delay={delay}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=1)
      return server, f"http://127.0.0.1:{port}/v1"
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.terminate()
        raise RuntimeError("sandbox_server did not start")
      time.sleep(0.1)


def _backend_cfg(base_url: str, conc: int) -> dict:
  os.environ.setdefault("SANDBOX_BENCH_KEY", "bench-key")
  return dict(kind="openai", base_url=base_url, api="chat", api_key_env="SANDBOX_BENCH_KEY",
              concurrency=conc, timeout_s=30.0, max_retries=2, backoff_s=0.1, backoff_max_s=1.0)


def bench_backend_cpu(n_calls: int, reps: int) -> dict:
  """The OpenAI backend alone (no society around it): client CPU ms per call of `complete`
  and of `choose`, against a server that answers at once, 16 in flight, best of `reps`."""
  import asyncio
  from stable_alignment_jax.sandbox.backends import Request, make_backend
  server, url = start_server(0.0)
  try:
    backend = make_backend("srv", ml_collections.ConfigDict(_backend_cfg(url, 16)))
    prompt = "Question: how do I stay safe online?" + " Please answer with care." * 20
    gen = [Request("srv", "agent", f"{prompt} ({i})", 24, 0.7, 0.95, i, system="Be kind.")
           for i in range(n_calls)]
    cho = [Request("srv", "observer", f"{prompt} ({i})", 1, 0.0, 1.0, i, prefix="Rating:",
                   choices=tuple("1234567")) for i in range(n_calls)]

    async def go():
      await backend.complete(gen[:16])  # pool and connections up
      out = {"complete": [], "choose": []}
      for _ in range(reps):
        for name, method, reqs in (("complete", backend.complete, gen),
                                   ("choose", backend.choose, cho)):
          c0 = time.process_time()
          await method(reqs)
          out[name].append(1e3 * (time.process_time() - c0) / n_calls)
      await backend.aclose()
      return out

    out = asyncio.run(go())
    return {k: min(v) for k, v in out.items()} | {"all": out}
  finally:
    server.terminate()
    server.wait(timeout=10)


def bench_http(n_agents: int, tmp: str, reps: int = 1) -> dict:
  server, url = start_server(0.2)
  try:
    out = {1: [], 16: [], "cpu16": [], "resume1": [], "resume16": []}
    for rep in range(reps):
      for conc in ((16, 1) if rep % 2 == 0 else (1, 16)):  # alternated
        c = _society(os.path.join(tmp, f"http{conc}_{rep}.sqlite"), n_agents)
        c.world.prior_file = ""  # no prior memories: `resume`'s setup stays out of the CPU figure
        c.backends = ml_collections.ConfigDict({"srv": _backend_cfg(url, conc)})
        c.agent_models = ml_collections.ConfigDict({
            "a": dict(backend="srv", model="agent", count=-1)})
        c.observer = ml_collections.ConfigDict(dict(backend="srv", model="observer"))
        runner.start(c, progress=False, max_steps=0)
        t0, cpu0, srv0 = time.perf_counter(), time.process_time(), _cpu(server.pid)
        runner.resume(c.store, progress=False)
        out[f"resume{conc}"].append(time.perf_counter() - t0)
        # CPU seconds of this client and of the server: at 200 ms per call the client must stay
        # under 200/16 = 12.5 ms of CPU per call (plus the server's) for 16x to be reachable.
        cpu = (time.process_time() - cpu0, _cpu(server.pid) - srv0)
        s = Store(c.store)
        out[conc].append(sum(w for _, _, w, _ in s.step_rows()))
        calls = s.count("calls")
        s.close()
        if conc == 16:
          out["cpu16"].append([1000 * x / calls for x in cpu])
    c1, c16 = min(out[1]), min(out[16])
    return {"agents": n_agents, "calls": calls, "c1_s": c1, "c16_s": c16, "all_c1_s": out[1],
            "all_c16_s": out[16], "speedup": c1 / c16,
            "median_speedup": statistics.median(out[1]) / statistics.median(out[16]),
            "ideal_c1_s": 0.2 * calls, "resume_c1_s": min(out["resume1"]),
            "resume_c16_s": min(out["resume16"]),
            "cpu_ms_per_call": min(out["cpu16"], key=lambda x: x[0])}
  finally:
    server.terminate()
    server.wait(timeout=10)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--agents", type=int, default=64)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--http_agents", type=int, default=16)
  ap.add_argument("--http_reps", type=int, default=2, help="alternated c16/c1 pairs")
  ap.add_argument("--cpu_calls", type=int, default=176, help="calls per backend-alone CPU run")
  ap.add_argument("--skip", default="", help="comma list of sections to skip: jax,buckets,http")
  ap.add_argument("--json", default="", help="also write the figures here")
  a = ap.parse_args()
  if not (os.path.exists(QUESTIONS) and os.path.exists(PRIORS)):
    sys.exit(f"needs the question pool and HH-RLHF priors under {SHARED}")
  with tempfile.TemporaryDirectory() as tmp, common.Run("sandbox", a.json) as run:
    skip = a.skip.split(",")
    if "buckets" not in skip:
      k = bench_buckets(max(2, a.reps), tmp)
      run.mark("after (c)")
      run.data["buckets"] = k
      for name, v in k.items():
        run.row(f"(c) tiny society, {name}", common.summary(v["times"]) + f" per round; first "
                f"round incl. compiles {v['first_s']:.1f} s; {v['rows']} calls padded to "
                f"{v['padded_rows']} rows (buckets {v['buckets'] or 'none'})")
    if "jax" not in skip:
      r = bench_jax(a.agents, a.reps, tmp)
      run.mark("after (a)")
      run.data["jax"] = r
      # Times are the round's step (Back-Scatter: prompts, calls, parsing, call log; the store
      # commit and `resume`'s setup excluded); the whole `resume` is printed beside it.
      run.row("(a) JAX backend", f"{r['agents']} agents, one round: {r['calls']} calls in "
              f"{r['generate_batches']} generate batches (rows {r['batch_rows']})")
      run.row("(a) round step s", common.summary(r["all_step_s"]))
      run.row("(a) bare batched generate s", common.summary(r["all_bare_s"]))
      run.row("(a) round / bare generate", f"{r['ratio']:.3f} of minima (target <= 1.5); "
              f"pairwise {[round(x, 3) for x in r['pairwise']]}; round / its own generate time "
              f"{r['inside_ratio']:.3f}; whole `resume` incl. setup {r['resume_s']:.2f} s")
    if "http" not in skip:
      cpu = bench_backend_cpu(a.cpu_calls, 3)
      run.data["backend_cpu"] = cpu
      run.row("(b) backend alone, client CPU", f"complete {cpu['complete']:.2f} ms/call, choose "
              f"{cpu['choose']:.2f} ms/call (min of 3 runs of {a.cpu_calls} calls, 16 in "
              "flight, server answering at once)")
      h = bench_http(a.http_agents, tmp, a.http_reps)
      run.data["http"] = h
      run.row("(b) HTTP society", f"200 ms per call, {h['agents']} agents, {h['calls']} calls, "
              "the OpenAI backend as configured by users (one client per backend)")
      run.row("(b) concurrency 1 s", common.summary(h["all_c1_s"]) +
              f"; serial floor {h['ideal_c1_s']:.1f} s")
      run.row("(b) concurrency 16 s", common.summary(h["all_c16_s"]) +
              f"; floor {h['ideal_c1_s'] / 16:.2f} s")
      # The baseline (concurrency 1) checked against its own floor: calls x 200 ms.
      run.check(*common.sanity("concurrency 1", h["c1_s"], h["ideal_c1_s"], tolerance=1.25))
      run.row("(b) speed-up c1 / c16", f"{h['speedup']:.1f}x of minima, {h['median_speedup']:.1f}x "
              f"of medians (target >= 12x)")
      run.row("(b) CPU per call at c16", f"client {h['cpu_ms_per_call'][0]:.2f} ms (whole society:"
              f" prompts, parsing, store), server {h['cpu_ms_per_call'][1]:.2f} ms (16x needs "
              "their sum well under 12.5 ms on a free core)")


if __name__ == "__main__":
  main()
