"""OpenAI-compatible HTTP server over our model (FastAPI + uvicorn).

  python -m stable_alignment_jax.serve --checkpoint=runs/stage3 [--tokenizer=PATH]
      [--host=127.0.0.1] [--port=8000] [--chat_template=auto|model|alpaca|FILE.json]
      [--api_key_env=NAME] [--max_batch=32] [--batch_wait_ms=10]

Then any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions. Both POST endpoints return `logprobs` (chat: `logprobs` +
`top_logprobs`; completions: `logprobs=N`, N <= 20): the model's next-token log-probabilities,
equal to TextSampler's scores. A final assistant message is continued (vLLM's
`continue_final_message`, `add_generation_prompt=false`), so SANDBOX reads verified choices here. Chat messages go through the chat template: by default the
checkpoint's own (its jinja template, rendered by transformers; generation stops at its
end-of-turn token), else Alpaca (chat_templates.py, whose turn marker is added to the
request's stop strings). /v1/completions sends the prompt as raw text.

Batching: concurrent requests are gathered (a short wait window, a row cap) into one sampler
call; see serving/batcher.py. `/health` reports `generate_calls`.

Streaming (`stream: true`) sends server-sent events in OpenAI's chunk format ending with
`data: [DONE]`, as the batch decodes: the sampler hands back every row's tokens every
`--stream_chunk` decode steps and the new text leaves at once (streamed and non-streamed requests
share batches). Requests are checked before the stream starts, so bad ones get a 4xx status; a
failure while decoding arrives as an `error` event.

Security: binds 127.0.0.1 unless --host says otherwise. With --api_key_env=NAME the key is read
from that environment variable and every request must send `Authorization: Bearer <key>`;
the key is never logged.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
import sys
from typing import Any, AsyncIterator, Sequence

from absl import app, flags
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stable_alignment_jax.serving import logprobs as logprobs_lib
from stable_alignment_jax.serving.engine import ContextError, Engine, Output
from stable_alignment_jax.serving.protocol import APIError, ChatRequest, CompletionRequest, parse
from stable_alignment_jax.sampling.text_sampler import Delta


def _error_response(e: APIError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: Request) -> Any:
  raw = await request.body()
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _usage(prompt_tokens: int, outs: Sequence[Output]) -> dict:
  completion = sum(o.completion_tokens for o in outs)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
          "total_tokens": prompt_tokens + completion}


def _sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
  """The ASGI app; starts the engine's batcher on startup and stops it on shutdown."""
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    engine.start()
    yield
    engine.stop()

  app = FastAPI(title="stable_alignment_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)

  @app.middleware("http")
  async def check_api_key(request: Request, call_next):
    if api_key is not None:
      sent = request.headers.get("authorization", "")
      if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
        what = "missing" if not sent else "incorrect"
        return _error_response(APIError(
            401, f"{what} API key: send 'Authorization: Bearer <key>'",
            type="invalid_request_error", code="invalid_api_key"))
    return await call_next(request)

  @app.exception_handler(APIError)
  async def on_api_error(_request, e: APIError):
    return _error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def on_http_error(request, e: StarletteHTTPException):
    code = "not_found" if e.status_code == 404 else None
    return _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: "
                                    f"{e.detail}", code=code))

  def check_model(name: str):
    if name != engine.model_name:
      raise APIError(404, f"model {name!r} does not exist; this server serves "
                     f"{engine.model_name!r}", param="model", code="model_not_found")

  def max_tokens_for(prompts: Sequence[list[int]], requested: int | None,
                     prompt_param: str) -> list[int]:
    out = []
    for p in prompts:
      try:
        out.append(engine.resolve_max_tokens(len(p), requested))
      except ContextError as e:
        param = "max_tokens" if engine.max_new_tokens(len(p)) else prompt_param
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    return out

  def rows(req, prompts: list[list[int]], max_tokens: list[int], stop: list[str]):
    return engine.rows(prompts, max_tokens=max_tokens, n=req.n, temperature=req.temperature,
                       top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop)

  def generation_error(e: Exception) -> APIError:
    if isinstance(e, ValueError):  # the sampler refused the shapes: the request's fault
      return APIError(400, str(e))
    logging.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}", type="server_error")

  async def run(req, prompts, max_tokens, stop) -> list[Output]:
    try:
      return await asyncio.wrap_future(engine.batcher.submit(rows(req, prompts, max_tokens, stop)))
    except Exception as e:  # noqa: BLE001
      raise generation_error(e) from None

  async def scored(prompts, outs, top_n: int) -> list:
    """Each output's token logprobs (serving/logprobs.py), scored off the event loop."""
    try:
      return [await asyncio.to_thread(logprobs_lib.score, engine.sampler, p,
                                      logprobs_lib.counted_tokens(engine.sampler, o), top_n)
              for p, o in zip(prompts, outs)]
    except Exception as e:  # noqa: BLE001
      raise generation_error(e) from None

  async def events(req, prompts, max_tokens, stop) -> AsyncIterator[tuple[int, Delta]]:
    try:
      async for item in engine.stream(rows(req, prompts, max_tokens, stop)):
        yield item
    except Exception as e:  # noqa: BLE001 - the 200 header is gone: an error event instead
      yield -1, generation_error(e)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": engine.model_name,
            "generate_calls": engine.sampler.sampler.calls, "rows": engine.batcher.rows}

  def model_card():
    return {"id": engine.model_name, "object": "model", "created": created,
            "owned_by": "stable_alignment_jax"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def model(model_id: str):
    check_model(model_id)
    return model_card()

  @app.post("/v1/completions")
  async def completions(request: Request):
    req = parse(CompletionRequest, await _json_body(request))
    req.check()
    check_model(req.model)
    vocab = engine.tokenizer.vocab_size
    prompts = []
    for i, p in enumerate(req.prompt_list()):
      if isinstance(p, list):
        if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
          raise APIError(400, f"prompt[{i}]: token ids must be a non-empty list of ints in "
                         f"[0, {vocab})", param="prompt")
        prompts.append(p)
      else:
        prompts.append(engine.encode(p))
    max_tokens = max_tokens_for(prompts, req.max_tokens, "prompt")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": engine.model_name}
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
      return _stream(_completion_chunks(head, events(req, prompts, max_tokens, req.stops()),
                                        prompt_tokens, req))
    flat = await run(req, prompts, max_tokens, req.stops())
    usage = _usage(prompt_tokens, flat)
    lps = [None] * len(flat)
    if req.logprobs is not None:
      lps = [logprobs_lib.completion_format(s) for s in await scored(
          [prompts[i // req.n] for i in range(len(flat))], flat, req.logprobs)]
    choices = [{"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}
               for i, (o, lp) in enumerate(zip(flat, lps))]
    return {**head, "choices": choices, "usage": usage}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    req = parse(ChatRequest, await _json_body(request))
    req.check()
    check_model(req.model)
    try:
      text = engine.chat_prompt(req.messages)
    except ValueError as e:
      raise APIError(400, str(e), param="messages") from None
    prompt = engine.encode(text)
    stop = req.stops() + [s for s in engine.template.stop if s not in req.stops()]
    max_tokens = max_tokens_for([prompt], req.requested_max_tokens(), "messages")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": engine.model_name}
    if req.stream:
      return _stream(_chat_chunks(head, events(req, [prompt], max_tokens, stop),
                                  len(prompt), req))
    outs = await run(req, [prompt], max_tokens, stop)
    usage = _usage(len(prompt), outs)
    lps = [None] * len(outs)
    if req.logprobs:
      lps = [logprobs_lib.chat_format(s) for s in await scored(
          [prompt] * len(outs), outs, req.top_logprobs or 0)]
    choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                "logprobs": lp, "finish_reason": o.finish_reason}
               for i, (o, lp) in enumerate(zip(outs, lps))]
    return {**head, "choices": choices, "usage": usage}

  def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)

  async def _completion_chunks(head, deltas, prompt_tokens, req) -> AsyncIterator[str]:
    extra = {"usage": None} if _include_usage(req) else {}
    done = []
    async for i, d in deltas:
      if i < 0:
        yield _sse(d.body())
        break
      if d.text:
        yield _sse({**head, **extra, "choices": [
            {"index": i, "text": d.text, "logprobs": None, "finish_reason": None}]})
      if d.done is not None:
        done.append(d.done)
        yield _sse({**head, **extra, "choices": [
            {"index": i, "text": "", "logprobs": None, "finish_reason": d.done.finish_reason}]})
    if extra:
      yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, done)})
    yield "data: [DONE]\n\n"

  async def _chat_chunks(head, deltas, prompt_tokens, req) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if _include_usage(req) else {}

    def chunk(i, delta, finish_reason=None):
      return _sse({**head, **extra, "choices": [
          {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    for i in range(req.n):
      yield chunk(i, {"role": "assistant", "content": ""})
    done = []
    async for i, d in deltas:
      if i < 0:
        yield _sse(d.body())
        break
      if d.text:
        yield chunk(i, {"content": d.text})
      if d.done is not None:
        done.append(d.done)
        yield chunk(i, {}, d.done.finish_reason)
    if extra:
      yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, done)})
    yield "data: [DONE]\n\n"

  return app


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
  return StreamingResponse(chunks, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  args = flags.FLAGS
  if args.checkpoint is None:
    raise app.UsageError("--checkpoint is required", exitcode=2)
  # force: app.run has put absl's handler on the root logger; this format and level replace it.
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  api_key = None
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
      raise SystemExit(f"--api_key_env={args.api_key_env}: that environment variable is unset "
                       "or empty")
  from stable_alignment_jax.serving.engine import load_engine
  kw = {"model_name": args.model_name} if args.model_name else {}
  try:
    engine = load_engine(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                         cache_dtype=args.cache_dtype,
                         chat_template=args.chat_template, max_batch=args.max_batch,
                         wait_ms=args.batch_wait_ms, default_max_tokens=args.default_max_tokens,
                         chunk=args.stream_chunk, **kw)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: cannot load --checkpoint={args.checkpoint}: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  import uvicorn
  logging.info("serving %r on http://%s:%d/v1 (API key %s)", engine.model_name, args.host,
               args.port, "required" if api_key else "not required")
  uvicorn.run(create_app(engine, api_key=api_key), host=args.host, port=args.port,
              log_level=args.log_level)


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import;
  each `--snake_case` flag also answers to its `--kebab-case` spelling."""

  from stable_alignment_jax.serving.engine import define_flag as flag, define_model_flags
  define_model_flags()
  flag(flags.DEFINE_string, "model_name", None, "the id clients send as `model` (default: "
       "checkpoint directory name)")
  flag(flags.DEFINE_string, "host", "127.0.0.1", "address to bind (default: loopback only)")
  flag(flags.DEFINE_integer, "port", 8000, None)
  flag(flags.DEFINE_integer, "max_batch", 32, "most rows in one generate call")
  flag(flags.DEFINE_float, "batch_wait_ms", 10.0,
       "how long the first request of a batch waits for company")
  flag(flags.DEFINE_integer, "stream_chunk", 8,
       "decode steps between streamed chunks (fewer: earlier text, more host round trips)")
  flag(flags.DEFINE_integer, "default_max_tokens", 256,
       "chat max_tokens when the request gives none (capped by the context)")
  flag(flags.DEFINE_string, "api_key_env", None,
       "name of an environment variable holding the API key clients must send")
  flag(flags.DEFINE_string, "log_level", "info", None)
  app.run(main)


if __name__ == "__main__":
  cli()
