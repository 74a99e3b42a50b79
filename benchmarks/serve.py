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
timing. Printed: requests/s, completion tokens/s and generate calls per phase, then the ratio
concurrency-16 / concurrency-1 (the batching gain).

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

# One CPU device: drop a forced device count (the tests set one) before jax is imported.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import json  # noqa: E402

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from stable_alignment_jax.generate import SamplingParams  # noqa: E402
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
  args = ap.parse_args()

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
  direct = {1: [], c: []}
  for _ in range(5):
    for rows in (1, c):
      t0 = time.perf_counter()
      sampler.generate(ids[:rows], sp)
      direct[rows].append(time.perf_counter() - t0)
  d1, dc = statistics.median(direct[1]), statistics.median(direct[c])
  print(f"sampler alone: 1 row {d1 * 1e3:.1f} ms, {c} rows {dc * 1e3:.1f} ms per call "
        f"-> rows/s gain x{c * d1 / dc:.2f} (the ceiling for batching)", flush=True)
  server, thread, base = start_server(engine)
  results = {1: [], args.concurrency: []}
  try:
    for r in range(args.rounds):
      for c in (1, args.concurrency):
        calls = sampler.calls
        secs, toks = asyncio.run(phase(base, prompts, args.max_tokens, c))
        calls = sampler.calls - calls
        results[c].append((secs, toks))
        print(f"round {r} concurrency {c:2d}: {args.requests} requests in {secs:6.2f} s = "
              f"{args.requests / secs:6.2f} req/s, {toks / secs:7.1f} tok/s, "
              f"{calls} generate calls", flush=True)
    times = asyncio.run(streamed(base, prompts[:args.stream_requests], args.max_tokens))
  finally:
    server.should_exit = True
    thread.join(30)

  def med(c, key):
    return statistics.median(key(s, t) for s, t in results[c])

  rps1, rps16 = med(1, lambda s, t: args.requests / s), med(c, lambda s, t: args.requests / s)
  tps1, tps16 = med(1, lambda s, t: t / s), med(c, lambda s, t: t / s)
  print(f"median concurrency 1: {rps1:.2f} req/s, {tps1:.1f} tok/s; "
        f"concurrency {c}: {rps16:.2f} req/s, {tps16:.1f} tok/s")
  print(f"batching gain (concurrency {c} / concurrency 1): requests/s x{rps16 / rps1:.2f}, "
        f"tokens/s x{tps16 / tps1:.2f}")

  ttfc, total = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
  print(f"streamed {args.max_tokens} tokens ({min(t[2] for t in times)}-"
        f"{max(t[2] for t in times)} generated), {len(times)} requests one at a time, a chunk every "
        f"{args.stream_chunk} decode steps: median first text chunk {ttfc * 1e3:.1f} ms, whole "
        f"stream {total * 1e3:.1f} ms (first chunk at {ttfc / total:.0%} of the total)")


if __name__ == "__main__":
  main()
