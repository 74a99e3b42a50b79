"""Serving throughput: concurrency 16 vs concurrency 1 against the OpenAI-compatible server, and
the streamed time to the first chunk.

The server is `serve.create_app` over `load_engine("random:tiny")` (or `--checkpoint`; default
batching settings: max_batch 32, 10 ms wait window) under uvicorn on 127.0.0.1 in a thread of
this process, so every batch shape can be compiled directly before timing; the client is an
asyncio `httpx` client posting OpenAI `/v1/completions` requests (it shares the process, and the
GIL, with the server in both phases alike). Each phase sends the same number of completion
requests (fixed max_tokens, greedy, prompts of one padded length), either one at a time
(concurrency 1) or with 16 in flight (concurrency 16). Phases alternate (1, 16, 1, 16, ...) so
machine load hits both alike; every compiled shape (batch 1, 2, 4, ... 32 rows) is built before
timing; the order reverses each round. Printed: requests/s, completion tokens/s and generate
calls per phase, then the ratio concurrency-16 / concurrency-1 (the batching gain) of the best
and of the median rounds. The baseline, concurrency 1, is checked against the sampler's own
1-row call timed alone in the same process plus the batching window it waits out. The load average is
printed before, between and after, and the run flagged when it was above 1.0
(benchmarks/common.py).

Streaming: `--stream_requests` streamed completions of `--max_tokens` tokens, one at a time,
each timed from sending the request to its first text chunk and to the end of the stream (the
server sends a chunk every `--stream_chunk` decode steps); printed as medians and their ratio.

  python benchmarks/serve.py [--requests 64] [--max_tokens 64] [--rounds 3] [--batch_wait_ms 10]
      [--stream_requests 8] [--stream_chunk 8]
"""

import argparse
import asyncio
import os
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

common.one_cpu_device()  # before jax is imported

import json  # noqa: E402

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from stable_alignment_jax.sampling.generate import SamplingParams  # noqa: E402
from stable_alignment_jax.serve import create_app  # noqa: E402
from stable_alignment_jax.serving.engine import load_engine  # noqa: E402

MODEL = "random:tiny"  # the name the server gives it too (load_engine: the spec's basename)


def start_server(engine):
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    if time.monotonic() > deadline:
      raise SystemExit("server did not start in 60 s")
    time.sleep(0.05)
  return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def phase(base: str, prompts, max_tokens: int, concurrency: int):
  """(seconds, completion tokens) for all prompts with `concurrency` requests in flight."""
  sem = asyncio.Semaphore(concurrency)
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
    async def one(p):
      async with sem:
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": p, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*[one(p) for p in prompts])
    return time.perf_counter() - t0, sum(tokens)


async def streamed(base: str, prompts, max_tokens: int) -> list[tuple[float, float, int]]:
  """(seconds to the first text chunk, seconds to the end, completion tokens) per streamed
  request, one at a time."""
  out = []
  async with httpx.AsyncClient(base_url=base, timeout=600) as client:
    for p in prompts:
      t0, first = time.perf_counter(), None
      async with client.stream("POST", "/v1/completions", json={
          "model": MODEL, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
          if not line.startswith("data: {"):
            continue
          event = json.loads(line[6:])
          if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
          elif first is None and event["choices"][0]["text"]:
            first = time.perf_counter() - t0
      out.append((first if first is not None else float("nan"), time.perf_counter() - t0,
                  tokens))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--max_tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--concurrency", type=int, default=16)
  ap.add_argument("--batch_wait_ms", type=float, default=10.0, help="the server's wait window")
  ap.add_argument("--checkpoint", default=MODEL, help="the served model (default random:tiny)")
  ap.add_argument("--stream_requests", type=int, default=8)
  ap.add_argument("--stream_chunk", type=int, default=8, help="decode steps per streamed chunk")
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  with common.Run("serve", args.json) as run:
    _main(args, run)


def _main(args, run):
  engine = load_engine(args.checkpoint, wait_ms=args.batch_wait_ms, chunk=args.stream_chunk,
                       model_name=MODEL)
  sampler = engine.sampler.sampler  # the token-level Sampler under the TextSampler
  # Same padded prompt length for every request (bytes: "Request NNN: ..." is 29 tokens with BOS).
  prompts = [f"Request {i:03d}: please say more" for i in range(args.requests)]
  ids = [engine.encode(p) for p in prompts]
  assert len({max(16, 1 << (len(x) - 1).bit_length()) for x in ids}) == 1
  sp = SamplingParams(max_new_tokens=args.max_tokens)
  b = 1
  while b <= engine.batcher.max_batch:  # every batch bucket the phases can hit
    sampler.generate(ids[:1] * b, sp)
    b *= 2
  for _ in sampler.stream(ids[:1], sp, chunk=args.stream_chunk):  # the streamed program
    pass
  # The ceiling without HTTP: one direct sampler call of 1 row vs `concurrency` rows.
  c = args.concurrency
  direct = common.alternate({1: lambda: sampler.generate(ids[:1], sp),
                             c: lambda: sampler.generate(ids[:c], sp)}, 5)
  d1, dc = min(direct[1]), min(direct[c])
  run.row("sampler alone, 1 row", common.summary(direct[1]))
  run.row(f"sampler alone, {c} rows", common.summary(direct[c]) +
          f" -> rows/s gain x{c * d1 / dc:.2f} (the ceiling for batching)")
  server, thread, base = start_server(engine)
  results = {1: [], c: []}
  try:
    for r in range(args.rounds):
      for conc in ((1, c) if r % 2 == 0 else (c, 1)):
        calls = sampler.calls
        secs, toks = asyncio.run(phase(base, prompts, args.max_tokens, conc))
        calls = sampler.calls - calls
        results[conc].append((secs, toks))
        print(f"round {r} concurrency {conc:2d}: {args.requests} requests in {secs:6.2f} s = "
              f"{args.requests / secs:6.2f} req/s, {toks / secs:7.1f} tok/s, "
              f"{calls} generate calls", flush=True)
      run.mark(f"round {r}")
    times = asyncio.run(streamed(base, prompts[:args.stream_requests], args.max_tokens))
  finally:
    server.should_exit = True
    thread.join(30)

  secs = {k: [x for x, _ in v] for k, v in results.items()}
  tps = {k: [t / x for x, t in v] for k, v in results.items()}
  run.row("concurrency 1 phase", common.summary(secs[1]) +
          f"; tok/s max {max(tps[1]):.1f}, median {statistics.median(tps[1]):.1f}")
  run.row(f"concurrency {c} phase", common.summary(secs[c]) +
          f"; tok/s max {max(tps[c]):.1f}, median {statistics.median(tps[c]):.1f}")
  # A lone request waits out the batching window, then runs as the sampler's 1-row call.
  run.check(*common.sanity("concurrency 1 per request", min(secs[1]) / args.requests,
                           d1 + args.batch_wait_ms / 1e3))
  run.row(f"batching gain c{c} / c1", f"requests/s x{min(secs[1]) / min(secs[c]):.2f} of the "
          f"best rounds, x{statistics.median(secs[1]) / statistics.median(secs[c]):.2f} of the "
          "medians")

  ttfc, total = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
  run.row("streamed", f"{args.max_tokens} tokens ({min(t[2] for t in times)}-"
          f"{max(t[2] for t in times)} generated), {len(times)} requests one at a time, a chunk "
          f"every {args.stream_chunk} decode steps: median first text chunk {ttfc * 1e3:.1f} ms "
          f"(min {min(t[0] for t in times) * 1e3:.1f}), whole stream {total * 1e3:.1f} ms "
          f"(min {min(t[1] for t in times) * 1e3:.1f}; first chunk at {ttfc / total:.0%})")


if __name__ == "__main__":
  main()
