"""The serving engine: prompts in, completions (whole or streamed) out, shared by the HTTP server
and the CLI.

It owns a `TextSampler` (tokenizer, chat template, stop ids, OpenAI output semantics) and a
`Batcher` over it; it knows the context limits (including the sampler's power-of-two rounding) so
requests that cannot fit are refused up front instead of failing inside a shared batch.
"""

import asyncio
import os
import secrets
from typing import AsyncIterator, Sequence

from stable_alignment_jax.sampling.generate import SamplingParams
from stable_alignment_jax.serving.batcher import Batcher
from stable_alignment_jax.sampling.text_sampler import (  # noqa: F401 - ContextError is re-exported
    Completion, ContextError, Delta, Row, TextSampler)
from stable_alignment_jax.contracts import bucket

Output = Completion  # what a request gets back per choice


class Engine:

  def __init__(self, sampler: TextSampler, *, model_name: str, max_batch: int = 32,
               wait_ms: float = 10.0, default_max_tokens: int = 256, chunk: int = 8):
    self.sampler, self.model_name = sampler, model_name
    self.tokenizer, self.template = sampler.tokenizer, sampler.template
    self.default_max_tokens = default_max_tokens
    self.batcher = Batcher(sampler, max_batch=max_batch, wait_ms=wait_ms, chunk=chunk)
    self.context = sampler.context

  def start(self) -> "Engine":
    self.batcher.start()
    return self

  def stop(self):
    self.batcher.stop()

  # -- prompts -----------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    return self.sampler.encode(text)

  def chat_prompt(self, messages: Sequence[dict]) -> str:
    return self.sampler.render(messages)

  def max_new_tokens(self, prompt_len: int) -> int:
    """The most new tokens a prompt of this length may ask for (0 if the prompt alone is too long)."""
    return self.sampler.max_new_tokens(prompt_len)

  def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
    """Checks `requested` against the context; None = as many as fit, up to the default cap."""
    limit = self.max_new_tokens(prompt_len)
    if limit == 0:
      raise ContextError(
          f"the prompt has {prompt_len} tokens, which leaves no room in this model's context of "
          f"{self.context} tokens (prompts are padded to a power of two, here "
          f"{bucket(prompt_len, self.sampler.sampler.min_prompt)})")
    if requested is None:
      return min(limit, self.default_max_tokens)
    if requested > limit:
      raise ContextError(
          f"the prompt has {prompt_len} tokens and max_tokens={requested}; this model's context of "
          f"{self.context} tokens allows at most max_tokens={limit} for this prompt")
    return requested

  def rows(self, prompts: Sequence[Sequence[int]], *, max_tokens: Sequence[int], n: int = 1,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           seed: int | None = None, stop: Sequence[str] = ()) -> list[Row]:
    """n rows per prompt; row j of every prompt uses seed + j (random if None)."""
    if seed is None:
      seed = secrets.randbits(32)
    out = []
    for p, m in zip(prompts, max_tokens, strict=True):
      for j in range(n):
        sp = SamplingParams(max_new_tokens=m, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=(seed + j) % 2**32)
        out.append(Row(list(p), sp, tuple(stop)))
    return out

  # -- generating --------------------------------------------------------------------------------
  async def complete(self, prompts: Sequence[Sequence[int]], *, n: int = 1,
                     **kw) -> list[list[Completion]]:
    """n completions per prompt (keywords as `rows`)."""
    outs = await asyncio.wrap_future(self.batcher.submit(self.rows(prompts, n=n, **kw)))
    return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

  async def stream(self, rows: Sequence[Row]) -> AsyncIterator[tuple[int, Delta]]:
    """(row index, Delta) as the rows decode; every row's last Delta carries `done`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    future = self.batcher.submit(
        rows, on_delta=lambda i, d: loop.call_soon_threadsafe(queue.put_nowait, (i, d)))
    future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))
    while True:
      item = await queue.get()
      if item is None:
        break
      yield item
    future.result()  # a failure in the batch is raised here


def define_flag(define, name, default, help, **kw):
  """An absl flag (`define` = flags.DEFINE_string, ...) that also answers to its --kebab-case
  spelling; the serving CLIs call this inside their cli(), never at import."""
  from absl import flags
  define(name, default, help, **kw)
  if "_" in name:
    flags.DEFINE_alias(name.replace("_", "-"), name)


def define_model_flags() -> None:
  """The flags `load_engine` takes, shared by the server and the generate CLI."""
  from absl import flags
  define_flag(flags.DEFINE_string, "checkpoint", None,
              "random:tiny[:seed], an HF LLaMA directory or hub id, or one of our run directories")
  define_flag(flags.DEFINE_string, "tokenizer", None, "'byte', a .model file or a directory "
              "(default: the checkpoint's own; 'byte' for random:*)")
  define_flag(flags.DEFINE_string, "dtype", None,
              "compute dtype override, e.g. float32 or bfloat16")
  define_flag(flags.DEFINE_string, "cache_dtype", None, "KV cache dtype (default: the compute "
              "dtype); bfloat16 halves what a decode step reads (memory; "
              "slower on CPUs without bf16 arithmetic)")
  define_flag(flags.DEFINE_string, "chat_template", "auto", "auto (the checkpoint's own, else "
              "alpaca) | model | alpaca | alpaca_bare | plain | FILE.json")


def load_engine(checkpoint: str, *, tokenizer: str | None = None, dtype: str | None = None,
                chat_template: str = "auto", min_batch: int = 1, cache_dtype: str | None = None,
                **engine_kw) -> Engine:
  """An engine over `TextSampler.load(checkpoint)` (the tokenizer defaults to the checkpoint's
  own; chat_template auto = the checkpoint's own, else Alpaca)."""
  sampler = TextSampler.load(checkpoint, tokenizer=tokenizer or "", dtype=dtype,
                             chat_template=chat_template, min_batch=min_batch,
                             cache_dtype=cache_dtype)
  engine_kw.setdefault("model_name", os.path.basename(os.path.normpath(checkpoint)))
  return Engine(sampler, **engine_kw)
