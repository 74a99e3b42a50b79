"""The OpenAI-compatible server, driven by the official `openai` SDK over real HTTP on 127.0.0.1.

Expected outputs come from `Sampler.generate` called directly (a separate Sampler over the same
weights), from `TextSampler.complete` called directly (the real SmolLM2 with its own chat
template) and from hand-worked strings; nothing is compared with the server's own output alone.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import uuid

import httpx
import openai
import pytest
import transformers
import uvicorn
from flax import nnx

import subproc
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.model.llama import Llama
from stable_alignment_jax.model.presets import preset
from stable_alignment_jax.serve import create_app
from stable_alignment_jax.serving.engine import Engine
from stable_alignment_jax.sampling.text_sampler import TextSampler
from stable_alignment_jax.data.tokenizer import load_tokenizer

KEY = "test-key-not-a-secret"
MODEL = "tiny-test"


def _serve(engine, api_key=None):
  """uvicorn on a free loopback port in a thread: (server, thread, base URL)."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=api_key), log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert time.monotonic() < deadline, "server did not start"
    time.sleep(0.05)
  return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def srv():
  tok = load_tokenizer("byte")
  model = Llama(preset("tiny", vocab_size=tok.vocab_size, dtype="float32"), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  # Every call padded to 32 rows: batches of any size share one compiled shape (compiles, not
  # decoding, dominate this test's time on CPU).
  engine = Engine(TextSampler(graphdef, state, tok, min_batch=32), model_name=MODEL, max_batch=32,
                  wait_ms=20)
  server, thread, base = _serve(engine, KEY)
  # Independent of the server; same shapes, so the compiled programs are shared.
  ref = Sampler(graphdef, state, eos_id=tok.eos_id, pad_id=tok.pad_id, min_batch=32)
  yield types.SimpleNamespace(base=base, engine=engine, tok=tok, ref=ref,
                              client=openai.OpenAI(base_url=base + "/v1", api_key=KEY,
                                                   max_retries=0, timeout=120))
  server.should_exit = True
  thread.join(30)


# max_tokens in these tests are 8 or 16 so the sampler compiles few distinct shapes.
def direct(srv, prompt_ids, **sp):
  """Reference: new tokens and text from the Sampler itself (EOS removed from the text)."""
  ids = srv.ref.generate([prompt_ids], SamplingParams(**sp))[0]
  body = ids[:-1] if ids and ids[-1] == srv.tok.eos_id else ids
  return ids, srv.tok.decode(body)


def test_models_and_health(srv):
  assert [m.id for m in srv.client.models.list().data] == [MODEL]
  assert srv.client.models.retrieve(MODEL).id == MODEL
  r = httpx.get(srv.base + "/health", headers={"Authorization": f"Bearer {KEY}"})
  assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_greedy_equals_sampler(srv):
  prompt = "The meaning of life is"
  res = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
  prompt_ids = srv.tok.encode(prompt, bos=True)
  ids, text = direct(srv, prompt_ids, max_new_tokens=16)
  assert res.choices[0].text == text
  assert res.choices[0].finish_reason == ("stop" if ids[-1] == srv.tok.eos_id else "length")
  assert res.usage.prompt_tokens == len(prompt_ids) == len(prompt.encode()) + 1
  assert res.usage.completion_tokens == len(ids)
  assert res.usage.total_tokens == len(prompt_ids) + len(ids)


def test_chat_greedy_equals_sampler_on_alpaca_prompt(srv):
  res = srv.client.chat.completions.create(
      model=MODEL, temperature=0, max_tokens=16,
      messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}])
  layout = "Be kind.\n\n### Instruction:\nHi there\n\n### Response:\n"  # written by hand
  _, text = direct(srv, srv.tok.encode(layout, bos=True), max_new_tokens=16)
  assert res.choices[0].message.role == "assistant"
  assert res.choices[0].message.content == text
  assert res.usage.prompt_tokens == len(layout.encode()) + 1


def test_streaming_matches_non_streaming(srv):
  kw = dict(model=MODEL, prompt="Streaming test", max_tokens=16, temperature=0)
  whole = srv.client.completions.create(**kw).choices[0]
  chunks = list(srv.client.completions.create(stream=True, **kw))
  assert "".join(c.choices[0].text for c in chunks) == whole.text
  assert sum(bool(c.choices[0].text) for c in chunks) > 1  # sent piece by piece
  assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason

  msgs = [{"role": "user", "content": "Stream a reply"}]
  whole = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                             temperature=0)
  chunks = list(srv.client.chat.completions.create(
      model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert content == whole.choices[0].message.content
  assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
      whole.choices[0].finish_reason


def test_raw_stream_is_openai_sse(srv):
  with httpx.stream("POST", srv.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": MODEL, "prompt": "sse", "max_tokens": 8, "temperature": 0,
                          "stream": True}, timeout=60) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines() if line]
  assert all(e.startswith("data: ") for e in events)
  assert events[-1] == "data: [DONE]"
  first = json.loads(events[0][len("data: "):])
  assert first["object"] == "text_completion" and first["model"] == MODEL


def test_sampling_n_and_seed(srv):
  prompt = "Once upon a time"
  res = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0,
                                      top_p=0.9, seed=7, n=3)
  ids = srv.tok.encode(prompt, bos=True)
  want = [direct(srv, ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7 + j)[1]
          for j in range(3)]
  assert [c.index for c in res.choices] == [0, 1, 2]
  assert [c.text for c in res.choices] == want
  assert len(set(want)) > 1  # the seeds really differ
  again = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                        temperature=1.0, top_p=0.9, seed=7, n=3)
  assert [c.text for c in again.choices] == want


def test_stop_string_cuts_text(srv):
  prompt = "Stop here"
  full = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
  text = full.choices[0].text
  stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2])
  res = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                      stop=[stop])
  assert res.choices[0].text == text[:text.find(stop)]
  assert res.choices[0].finish_reason == "stop"
  assert res.usage.completion_tokens <= full.usage.completion_tokens


def test_100_concurrent_requests_are_batched(srv):
  prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(100)]

  async def fire():
    async with openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0,
                                  timeout=120) as client:
      return await asyncio.wait_for(asyncio.gather(*[
          client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
          for p in prompts]), timeout=180)

  calls_before = srv.engine.sampler.sampler.calls
  results = asyncio.run(fire())
  calls = srv.engine.sampler.sampler.calls - calls_before
  for p, res in zip(prompts, results):
    assert res.choices[0].text == direct(srv, srv.tok.encode(p, bos=True), max_new_tokens=8)[1], p
  assert calls < len(prompts), f"{calls} generate calls for {len(prompts)} requests: no batching"
  print(f"100 concurrent requests served in {calls} generate calls")


def _post(srv, path, body, key=KEY):
  headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
  if isinstance(body, (bytes, str)):
    return httpx.post(srv.base + path, content=body, headers=headers, timeout=60)
  return httpx.post(srv.base + path, json=body, headers=headers, timeout=60)


def _assert_error(r, status, *, param=None, code=None):
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  if param is not None:
    assert err["param"] == param
  if code is not None:
    assert err["code"] == code


def test_bad_input_gives_openai_errors_and_server_keeps_serving(srv):
  ok = {"model": MODEL, "prompt": "hi", "max_tokens": 8, "temperature": 0}
  _assert_error(_post(srv, "/v1/completions", b"{not json"), 400)
  _assert_error(_post(srv, "/v1/chat/completions", "[1, 2"), 400)
  _assert_error(_post(srv, "/v1/completions", {**ok, "model": "gpt-17"}), 404, param="model",
                code="model_not_found")
  _assert_error(_post(srv, "/v1/completions", {**ok, "max_tokens": -1}), 400, param="max_tokens")
  _assert_error(_post(srv, "/v1/completions", {k: v for k, v in ok.items() if k != "prompt"}),
                400, param="prompt")
  ctx = srv.engine.context
  _assert_error(_post(srv, "/v1/completions", {**ok, "prompt": "x" * ctx}), 400, param="prompt",
                code="context_length_exceeded")
  _assert_error(_post(srv, "/v1/chat/completions", {
      "model": MODEL, "messages": [{"role": "user", "content": "y" * ctx}]}), 400,
      param="messages", code="context_length_exceeded")
  _assert_error(_post(srv, "/v1/completions", {**ok, "max_tokens": ctx}), 400, param="max_tokens",
                code="context_length_exceeded")
  _assert_error(_post(srv, "/v1/completions", {**ok, "echo": True}), 400, param="echo")
  _assert_error(_post(srv, "/v1/completions", {**ok, "logprobs": 21}), 400, param="logprobs")
  _assert_error(_post(srv, "/v1/chat/completions", {
      "model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), 400, param="messages")
  _assert_error(_post(srv, "/v1/completions", ok, key=None), 401, code="invalid_api_key")
  _assert_error(_post(srv, "/v1/completions", ok, key="wrong"), 401, code="invalid_api_key")
  _assert_error(httpx.get(srv.base + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}),
                404)
  # The SDK maps them to its exception types.
  with pytest.raises(openai.NotFoundError):
    srv.client.completions.create(model="nope", prompt="hi", max_tokens=1)
  with pytest.raises(openai.BadRequestError):
    srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=-5)
  bad_key = openai.OpenAI(base_url=srv.base + "/v1", api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    bad_key.models.list()
  # Still serving, and still right.
  r = _post(srv, "/v1/completions", ok)
  assert r.status_code == 200
  assert r.json()["choices"][0]["text"] == direct(srv, srv.tok.encode("hi", bos=True),
                                                  max_new_tokens=8)[1]


def _ref_logprobs(srv, ids: list[int]) -> "np.ndarray":
  """log-softmax of the next token over the whole vocabulary, from the reference Sampler."""
  import numpy as np
  return np.asarray(srv.ref.next_token_logprobs([ids], list(range(srv.tok.vocab_size))))[0]


def test_chat_logprobs_continue_the_final_message_and_equal_sampler_scores(srv):
  """The chat endpoint with a final assistant message continued (vLLM's spelling): its
  logprobs are the next-token scores after the prompt as laid out by hand, to 1e-5, and the
  top_logprobs are the highest of them, in order."""
  import numpy as np
  msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate it"},
          {"role": "assistant", "content": "Rating:"}]
  r = _post(srv, "/v1/chat/completions", {
      "model": MODEL, "messages": msgs, "max_tokens": 3, "temperature": 0, "logprobs": True,
      "top_logprobs": 5, "continue_final_message": True, "add_generation_prompt": False})
  assert r.status_code == 200, r.text
  body = r.json()
  layout = "Be kind.\n\n### Instruction:\nRate it\n\n### Response:\nRating:"  # by hand
  ids = srv.tok.encode(layout, bos=True)
  assert body["usage"]["prompt_tokens"] == len(ids)
  content = body["choices"][0]["logprobs"]["content"]
  gen, _ = direct(srv, ids, max_new_tokens=3)
  gen = [t for t in gen if t != srv.tok.eos_id]
  assert len(content) == len(gen) and "".join(c["token"] for c in content) == \
      body["choices"][0]["message"]["content"]
  for j, c in enumerate(content):
    want = _ref_logprobs(srv, ids + gen[:j])
    assert abs(c["logprob"] - want[gen[j]]) < 1e-5
    top = np.argsort(-want, kind="stable")[:5]
    assert [t["token"] for t in c["top_logprobs"]] == [srv.tok.decode([int(t)]) for t in top]
    np.testing.assert_allclose([t["logprob"] for t in c["top_logprobs"]], want[top], atol=1e-5)
  # The same request without logprobs gives the same text; bad combinations are refused.
  plain = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                             temperature=0)
  assert plain.choices[0].message.content == body["choices"][0]["message"]["content"]
  assert plain.choices[0].logprobs is None
  bad = {"model": MODEL, "max_tokens": 1}
  _assert_error(_post(srv, "/v1/chat/completions", {**bad, "messages": msgs[:2],
                "continue_final_message": True}), 400, param="continue_final_message")
  _assert_error(_post(srv, "/v1/chat/completions", {**bad, "messages": msgs,
                "add_generation_prompt": True}), 400, param="continue_final_message")
  _assert_error(_post(srv, "/v1/chat/completions", {**bad, "messages": msgs,
                "top_logprobs": 3}), 400, param="top_logprobs")
  _assert_error(_post(srv, "/v1/chat/completions", {**bad, "messages": msgs, "logprobs": True,
                "stream": True}), 400, param="logprobs")


def test_completion_logprobs_equal_sampler_scores(srv):
  import numpy as np
  prompt = "Moral:"
  res = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      logprobs=3)
  ids = srv.tok.encode(prompt, bos=True)
  gen, text = direct(srv, ids, max_new_tokens=4)
  gen = [t for t in gen if t != srv.tok.eos_id]
  lp = res.choices[0].logprobs
  # (a byte token that is part of a UTF-8 character reads as U+FFFD alone, so the pieces
  # need not concatenate to the text here)
  assert res.choices[0].text == text and len(lp.tokens) == len(gen)
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(gen))]
  for j in range(len(gen)):
    want = _ref_logprobs(srv, ids + gen[:j])
    assert abs(lp.token_logprobs[j] - want[gen[j]]) < 1e-5
    top = np.argsort(-want, kind="stable")[:3]
    # Values against the reference; a random byte model's pieces are often UTF-8 fragments
    # with one text each (the likelier kept), so only the distinct values are compared.
    got = sorted(lp.top_logprobs[j].values(), reverse=True)
    assert 1 <= len(got) <= 3 and abs(got[0] - want[top[0]]) < 1e-5
    assert all(np.min(np.abs(want[top] - v)) < 1e-5 for v in got)


def _listening_addresses(port: int) -> set[str]:
  """Local IPv4 addresses with a listening TCP socket on `port`, read from /proc/net/tcp."""
  found = set()
  with open("/proc/net/tcp") as f:
    for line in f.readlines()[1:]:
      local, state = line.split()[1], line.split()[3]
      addr, p = local.split(":")
      if int(p, 16) == port and state == "0A":  # 0A = LISTEN
        found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
  return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_serve_main_takes_api_key_from_env_and_binds_loopback():
  env = subproc.jax_env(SAJ_TEST_SERVE_KEY="k-" + uuid.uuid4().hex)
  env.pop("SAJ_TEST_UNSET_KEY", None)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, "-m", "stable_alignment_jax.serve", "--checkpoint=random:tiny",
         f"--port={port}", "--log_level=warning"]
  unset = subprocess.Popen(cmd + ["--api_key_env=SAJ_TEST_UNSET_KEY"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  server = subprocess.Popen(cmd + ["--api_key_env=SAJ_TEST_SERVE_KEY"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    _, err = unset.communicate(timeout=300)
    assert unset.returncode != 0 and b"SAJ_TEST_UNSET_KEY" in err  # refuses to run unprotected
    base, key = f"http://127.0.0.1:{port}", env["SAJ_TEST_SERVE_KEY"]
    deadline = time.monotonic() + 300
    while True:
      assert server.poll() is None, server.stderr.read().decode()
      assert time.monotonic() < deadline, "server did not come up"
      try:
        if httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    assert _listening_addresses(port) == {"127.0.0.1"}  # the default --host
    _assert_error(httpx.get(base + "/health"), 401, code="invalid_api_key")
    _assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["random:tiny"]
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=base + "/v1", api_key="k-wrong", max_retries=0).models.list()
  finally:
    for p in (unset, server):
      if p.poll() is None:
        p.terminate()
        try:
          p.wait(30)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
  assert key not in server.stderr.read().decode("utf-8", "replace")  # the key is never logged


def test_stream_chunks_leave_while_the_batch_is_still_decoding(srv, monkeypatch):
  """Counted in decode steps: the sampler's stream is held after its second chunk until the
  client has two text chunks in hand, so they cannot have waited for the end of decoding."""
  prompt, max_tokens, chunk = "Streaming, step by step", 64, srv.engine.batcher.chunk
  ts = srv.engine.sampler
  first = [d[0].text for d in ts.stream([prompt], SamplingParams(max_new_tokens=max_tokens),
                                        chunk=chunk)]
  assert first[0] and first[1] and len(first) > 3  # the setting makes text in early chunks
  sampler, orig = ts.sampler, ts.sampler.stream
  got_two, log = threading.Event(), {"steps": 0}

  def held(prompts, params, chunk=8):
    for k, out in enumerate(orig(prompts, params, chunk=chunk)):
      log["steps"] = min((k + 1) * chunk, max_tokens)  # decode steps run so far
      yield out
      if k == 1:
        log["released"] = got_two.wait(120)

  monkeypatch.setattr(sampler, "stream", held)
  texts, steps_at_two = [], None
  with httpx.stream("POST", srv.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                          "temperature": 0, "stream": True}, timeout=180) as r:
    for line in r.iter_lines():
      if not line.startswith("data: {"):
        continue
      text = json.loads(line[len("data: "):])["choices"][0]["text"]
      if text:
        texts.append(text)
      if len(texts) == 2 and steps_at_two is None:
        steps_at_two = log["steps"]
        got_two.set()
  assert log["released"]  # the client had two chunks while decoding was held
  # Two chunks in hand after 2 * chunk decode steps, and decoding went on after that.
  assert steps_at_two == 2 * chunk and log["steps"] > steps_at_two
  assert "".join(texts) == "".join(first)


def test_streamed_and_plain_jobs_share_one_batch(srv):
  from stable_alignment_jax.serving.batcher import Batcher
  ts = srv.engine.sampler
  rows = [ts.prepare(p, SamplingParams(max_new_tokens=16)) for p in ("first one", "second")]
  batcher = Batcher(ts, wait_ms=2000, chunk=4).start()  # a long window: both land in it
  try:
    seen = []
    streamed = batcher.submit(rows[:1], on_delta=lambda i, d: seen.append(d))
    plain = batcher.submit(rows[1:])
    a, b = streamed.result(120), plain.result(120)
  finally:
    batcher.stop()
  assert batcher.batches == 1
  want = ts.complete_rows(rows)
  assert a + b == want
  assert "".join(d.text for d in seen) == want[0].text and seen[-1].done == want[0]
  assert sum(bool(d.text) for d in seen) > 1


def test_serve_bad_checkpoint_is_one_line_and_nonzero_exit():
  p = subprocess.run([sys.executable, "-m", "stable_alignment_jax.serve",
                      "--checkpoint=/no/such/run", "--log_level=warning"],
                     capture_output=True, text=True, env=subproc.jax_env(), timeout=300)
  assert p.returncode != 0 and p.stdout == ""
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "/no/such/run" in lines[0] and "not found" in lines[0], p.stderr


def test_smollm2_chat_through_the_sdk_uses_its_template_and_stops_at_im_end(smollm2_dir):
  ts = TextSampler.load(str(smollm2_dir), dtype="float32")
  server, thread, base = _serve(Engine(ts, model_name="smollm2", wait_ms=5))
  try:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    res = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32,
                                         temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32,
                                                 temperature=0, stream=True))
  finally:
    server.should_exit = True
    thread.join(30)
  want = ts.complete([msgs], SamplingParams(max_new_tokens=32))[0]  # directly, no HTTP
  assert res.choices[0].message.content == want.text
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
  im_end = ts.tokenizer.tok.token_to_id("<|im_end|>")
  assert want.token_ids[-1] == im_end and len(want.token_ids) < 32  # ended by its end of turn
  assert res.choices[0].finish_reason == "stop" == chunks[-1].choices[0].finish_reason
  assert "Paris" in want.text and "<|im" not in want.text
  rendered = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir)).apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=True)
  assert res.usage.prompt_tokens == len(ts.tokenizer.encode(rendered)) == want.prompt_tokens
