"""Batched sampling with a preallocated KV cache.

Prompts of different lengths are left-padded into one batch; prefill writes the whole prompt into
the model's KV cache in one forward pass, then a `jax.lax.while_loop` decodes one token per step
through the model for every sequence until all have stopped (any stop id or its own
max_new_tokens). The loop can run in chunks of steps (`Sampler.stream`): the carry goes back to
the host between chunks, so a server sends text while the rest is decoded. Sampling
parameters are per row (temperature, top-p, top-k, seed), so requests with different settings
share one batch and a row's output does not depend on what else is in the batch. Shapes are
bucketed (batch, prompt length and new-token count rounded up to powers of two) so one compiled
program serves many requests; a compile happens once per bucket.

A decode step reads only the filled part of the cache: the cache starts with room for a window
of `min_window` new tokens and doubles (`llama.grow_cache`) whenever the loop has filled it, up
to the bucketed max_new_tokens. The loop runs in segments, one compiled program per window, so a
request allowed 1024 tokens that stops after 100 never attends over 1024 slots. The cache may be
held in bf16 under f32 compute (`cache_dtype`): half the bytes each step reads. That pays where
bf16 dots are native (GPU, TPU); on a CPU without bf16 arithmetic (AVX2) XLA's bf16 dots run far
below its f32 ones, and a bf16 cache decodes slower than f32 (benchmarks/generate.py
--cache_dtype bfloat16, quiet machine: 20.6 vs 6.0 ms a step at position 1024, batch 16),
saving only memory.

CLI: python -m stable_alignment_jax.sampling.generate --checkpoint=DIR --prompt="..."
"""

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stable_alignment_jax.contracts import bucket
from stable_alignment_jax.model import llama, logprobs


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 0:
      raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks logits [B,V] outside each row's top-k (0 = off) and top-p nucleus with -inf."""
  v = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B,1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p[:, None]
  n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
  pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
  threshold = jnp.maximum(kth, pth)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def greedy_tokens(logits: jax.Array) -> jax.Array:
  """argmax over the last axis (the first of tied maxima), int32, as two plain reductions: XLA's
  CPU backend runs argmax's (value, index) reduction unvectorised, 3x slower over [16, 8000]
  (a tenth of a decode step of benchmarks/generate.py's model). NaN rows give the last id."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  v = logits.shape[-1]
  first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


def _choose(logits, key_b, temperature, top_k, top_p, sample: bool):
  """Next token per row: argmax where temperature == 0, else a filtered categorical draw."""
  greedy = greedy_tokens(logits)
  if not sample:
    return greedy
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  filtered = filter_logits(scaled, top_k, top_p)
  drawn = jax.vmap(jax.random.categorical)(key_b, filtered).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


class _Decode(NamedTuple):
  """The decode loop's carry: everything a later chunk of steps needs to continue."""
  step: jax.Array  # decode steps done
  tok: jax.Array  # [B] the token chosen last, not yet fed to the model
  cache: llama.KVCache
  key_mask: jax.Array  # [B, S] slots holding real tokens
  done: jax.Array  # [B]
  out: jax.Array  # [B, max_new] tokens so far
  lengths: jax.Array  # [B] for finished rows: their number of new tokens


def _pick(logits, base_keys, step, temperature, top_k, top_p, sample):
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base_keys, step)
  return _choose(logits, keys, temperature, top_k, top_p, sample)


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "max_new", "window", "cache_dtype", "sample"))
def _prefill(graphdef, state, tokens, prompt_mask, max_new_b, temperature, top_k, top_p, seeds,
             *, max_new: int, window: int, cache_dtype, sample: bool) -> _Decode:
  """tokens/prompt_mask: [B,P] left-padded. The whole prompt in one pass into a cache with room
  for `window` new tokens, and the first new token chosen."""
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  key_mask = jnp.zeros((b, p + window), bool).at[:, :p].set(prompt_mask)
  cache = llama.init_cache(model.cfg, b, p + window, dtype=cache_dtype)
  h, cache = model.hidden(tokens, positions=positions, key_mask=key_mask, cache=cache,
                          cache_index=0)
  logits = model.logits(h[:, -1])  # only the last position is projected onto the vocabulary
  first = _pick(logits, jax.vmap(jax.random.key)(seeds), 0, temperature, top_k, top_p, sample)
  zeros = jnp.zeros((b,), jnp.int32)
  return _Decode(jnp.int32(0), first, cache, key_mask, max_new_b <= 0,
                 jnp.zeros((b, max_new), jnp.int32), zeros)


@functools.partial(jax.jit, static_argnames=("p", "window", "cfg"))
def _grow(carry: _Decode, *, p: int, window: int, cfg) -> _Decode:
  """The carry with a cache (and key mask) of p + `window` slots (local layers' rings stop at
  their size)."""
  key_mask = jnp.pad(carry.key_mask, ((0, 0), (0, p + window - carry.key_mask.shape[1])))
  return carry._replace(cache=llama.grow_cache(carry.cache, p + window, cfg), key_mask=key_mask)


# XLA:CPU's YNNPACK dots read a decode step's cold weights slowly at 16 rows: without them (and
# with the attention's per-row products, `llama.Attention`) the decode loop of
# benchmarks/generate.py takes 3.5 instead of 4.9 ms a step at position 32, batch 16.
_CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def decode_compiler_options() -> dict:
  """XLA compile options for decode programs on the default backend: `_CPU_DECODE_OPTIONS` on
  CPU where this XLA knows them (an experimental option; an XLA without it refuses the name, and
  then decode compiles as everything else does), none elsewhere."""
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_DECODE_OPTIONS)(jnp.zeros(2)).block_until_ready()
  except jax.errors.JaxRuntimeError:
    return {}
  return dict(_CPU_DECODE_OPTIONS)


class jit_decode:
  """`jax.jit(fn, **jit_kw)` with `decode_compiler_options`, made on first use (the backend is
  not asked for at import: that would come before a multi-host run's jax.distributed setup).
  Calls and attributes (`lower`, `_cache_size`) go to the jitted function."""

  def __init__(self, fn, **jit_kw):
    functools.update_wrapper(self, fn)
    self._fn, self._jit_kw, self._jitted = fn, jit_kw, None

  def _get(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fn, compiler_options=decode_compiler_options() or None,
                             **self._jit_kw)
    return self._jitted

  def __call__(self, *args, **kw):
    return self._get()(*args, **kw)

  def __getattr__(self, name):
    return getattr(self._get(), name)


@functools.partial(jit_decode, static_argnames=("graphdef", "p", "sample"), donate_argnums=(2,))
def _decode(graphdef, state, carry: _Decode, until, prompt_len, max_new_b, temperature, top_k,
            top_p, seeds, eos_ids, *, p: int, sample: bool) -> _Decode:
  """Decode steps until every row is done, `until` steps are done in total (a traced bound, so
  streaming chunks of any size share one compiled program) or the cache (p prompt slots, then
  the window) is full."""
  model = nnx.merge(graphdef, state)
  max_new = carry.out.shape[1]
  window = carry.key_mask.shape[1] - p
  base_keys = jax.vmap(jax.random.key)(seeds)

  def cond(c: _Decode):
    return (c.step < jnp.minimum(until, min(max_new, window))) & ~jnp.all(c.done)

  def body(c: _Decode) -> _Decode:
    out = c.out.at[:, c.step].set(jnp.where(c.done, 0, c.tok))
    now_done = c.done | jnp.isin(c.tok, eos_ids) | (c.step + 1 >= max_new_b)
    lengths = jnp.where(~c.done & now_done, c.step + 1, c.lengths)
    slot = p + c.step
    key_mask = c.key_mask.at[:, slot].set(True)
    logits, cache = model(c.tok[:, None], positions=(prompt_len + c.step)[:, None],
                          key_mask=key_mask, cache=c.cache, cache_index=slot)
    nxt = _pick(logits[:, 0], base_keys, c.step + 1, temperature, top_k, top_p, sample)
    return _Decode(c.step + 1, nxt, cache, key_mask, now_done, out, lengths)

  return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("graphdef", "n"))
def _next_logprobs(graphdef, state, tokens, prompt_mask, ids=None, *, n: int = 1):
  """log p(next token = ids[j]) after each of the last n positions of left-padded rows:
  [B, n, J], or the whole distribution [B, n, V] when ids is None."""
  model = nnx.merge(graphdef, state)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  h, _ = model.hidden(tokens, positions=positions, key_mask=prompt_mask)
  return logprobs.vocab_logprobs(h[:, -n:], model.logits, ids)


class Sampler:
  """Holds a model (graphdef + state) and generates for lists of token-id prompts.

  cache_dtype: the KV cache's dtype (None: the compute dtype; "bfloat16" halves what a decode
    step reads under f32 compute, within bf16 rounding of the f32 cache's logits; slower on a
    CPU without bf16 arithmetic, see the module docstring).
  min_window: new-token slots the cache starts with (it doubles as it fills; 0: room for all of
    max_new_tokens from the start, one decode program per bucket).
  """

  def __init__(self, graphdef, state, *, eos_id: int | Sequence[int], pad_id: int = 0, mesh=None,
               min_batch: int = 1, min_prompt: int = 16, cache_dtype: str | None = None,
               min_window: int = 32):
    # Decoding runs the layers unrolled (see `llama.relayout`), a scanned model is re-laid once;
    # nothing is differentiated here, so a training run's remat policy is dropped.
    self.graphdef, self.state = llama.relayout(graphdef, state, scan_layers=False, remat="none")
    self.cfg = nnx.merge(self.graphdef, self.state).cfg  # static data of the root module
    self.eos_ids = [int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id]
    self.eos_id = self.eos_ids[0]
    self.pad_id, self.mesh = pad_id, mesh
    self.min_batch, self.min_prompt = min_batch, min_prompt
    if cache_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"cache_dtype must be None, 'float32' or 'bfloat16', got {cache_dtype!r}")
    if min_window < 0:
      raise ValueError(f"min_window must be >= 0, got {min_window}")
    self.cache_dtype, self.min_window = cache_dtype, min_window
    self.calls = 0  # generate calls made (serving counts batching with it)

  @classmethod
  def from_module(cls, model: nnx.Module, **kw) -> "Sampler":
    graphdef, state = nnx.split(model)
    return cls(graphdef, state, **kw)

  def _left_pad(self, prompts, min_batch: int | None = None):
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    b = bucket(n, self.min_batch if min_batch is None else min_batch)
    p = bucket(max(len(x) for x in prompts), self.min_prompt)
    tokens = np.full((b, p), self.pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, x in enumerate(prompts):
      tokens[i, p - len(x):] = x
      mask[i, p - len(x):] = True
    mask[n:, -1] = True  # padding rows hold one dummy token so their softmax is well defined
    return tokens, mask

  def _call(self, fn, *args, **kw):
    if self.mesh is None:
      return fn(*args, **kw)
    from stable_alignment_jax.model import sharding  # the sampler works without a mesh too
    with sharding.activate(self.mesh):
      return fn(*args, **kw)

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
               ) -> list[list[int]]:
    """New tokens for each prompt (the EOS/stop token included when it was produced)."""
    out = []
    for out in self.stream(prompts, params, chunk=0):
      pass
    return out

  def stream(self, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             chunk: int = 8) -> Iterator[list[list[int]]]:
    """Yields each row's new tokens so far after every `chunk` decode steps (0 = only at the
    end); the last yield is the finished result, as `generate` returns it."""
    n = len(prompts)
    if n == 0:
      return
    params = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(params) != n:
      raise ValueError(f"{n} prompts but {len(params)} sampling params")
    tokens, mask = self._left_pad(prompts)
    b, p = tokens.shape
    max_new_b = np.array([sp.max_new_tokens for sp in params], np.int32)
    new = bucket(int(max_new_b.max()), 1)
    if p + new > self.cfg.max_seq_len:
      raise ValueError(f"prompt ({max(len(x) for x in prompts)} tokens) + max_new_tokens "
                       f"({int(max_new_b.max())}) exceeds the model context "
                       f"{self.cfg.max_seq_len} after bucketing to {p}+{new}")
    pad = b - n
    col = lambda vals, dt: np.concatenate([np.asarray(vals, dt), np.zeros(pad, dt)])
    temperature = col([sp.temperature for sp in params], np.float32)
    top_k = col([sp.top_k for sp in params], np.int32)
    top_p = np.concatenate([np.asarray([sp.top_p for sp in params], np.float32),
                            np.ones(pad, np.float32)])
    seeds = col([sp.seed for sp in params], np.uint32)
    max_new_arr = col(max_new_b, np.int32)
    sample = bool((temperature > 0).any())
    prompt_len = mask.sum(axis=1).astype(np.int32)
    eos = np.asarray(self.eos_ids, np.int32)
    self.calls += 1
    window = min(new, bucket(self.min_window, 1)) if self.min_window else new
    carry = self._call(_prefill, self.graphdef, self.state, tokens, mask, max_new_arr,
                       temperature, top_k, top_p, seeds, max_new=new, window=window,
                       cache_dtype=self.cache_dtype, sample=sample)
    step = chunk if chunk > 0 else new
    until = steps = 0
    finished = new == 0 or bool(max_new_arr.max() <= 0)
    while True:
      until = min(until + step, new)
      while steps < until and not finished:  # segments: one per window the chunk reaches
        if steps >= window:
          window = min(new, 2 * window)
          carry = self._call(_grow, carry, p=p, window=window, cfg=self.cfg)
        carry = self._call(_decode, self.graphdef, self.state, carry, np.int32(until),
                           prompt_len, max_new_arr, temperature, top_k, top_p, seeds, eos, p=p,
                           sample=sample)
        steps, done = int(carry.step), np.asarray(carry.done)
        finished = steps >= new or bool(done.all())
      out, done = np.asarray(carry.out), np.asarray(carry.done)
      lengths = np.where(done, np.asarray(carry.lengths), steps)
      yield [out[i, :lengths[i]].tolist() for i in range(n)]
      if finished:
        return

  def next_token_logprobs(self, prompts: Sequence[Sequence[int]],
                          token_ids: Sequence[int]) -> np.ndarray:
    """log p(next token) at `token_ids` after each prompt (log-softmax over the whole
    vocabulary): [len(prompts), len(token_ids)]. One prefill-sized forward, no decoding."""
    if not prompts:
      return np.zeros((0, len(token_ids)), np.float32)
    tokens, mask = self._left_pad(prompts)
    ids = np.asarray(token_ids, np.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
      raise ValueError(f"token ids {token_ids} outside the vocabulary of {self.cfg.vocab_size}")
    self.calls += 1
    out = self._call(_next_logprobs, self.graphdef, self.state, tokens, mask, ids)
    return np.asarray(out)[:len(prompts), 0]

  def continuation_logprobs(self, prompt: Sequence[int],
                            continuation: Sequence[int]) -> np.ndarray:
    """The next-token distribution (log-softmax over the whole vocabulary) that each token of
    `continuation` was drawn from: row j follows prompt + continuation[:j]. [J, V] f32. The
    same numbers as `next_token_logprobs` of those J rows, from ONE forward of
    prompt + continuation[:-1] instead of J."""
    if not continuation:
      return np.zeros((0, self.cfg.vocab_size), np.float32)
    if not prompt:
      raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    row = list(prompt) + list(continuation[:-1])
    tokens, mask = self._left_pad([row])
    n = bucket(len(continuation))  # a few compiled shapes; the extra positions are cut below
    self.calls += 1
    out = self._call(_next_logprobs, self.graphdef, self.state, tokens, mask, n=n)
    return np.asarray(out)[0, n - len(continuation):]


if __name__ == "__main__":
  # `python -m stable_alignment_jax.sampling.generate --checkpoint=DIR --prompt=...`: the CLI
  # lives with the serving code (it shares the engine and chat template); this module stays the sampler.
  # Run as a script this file is `__main__`, which nothing imports, so forwarding by module
  # name adds no import edge (serving imports the sampler, never the reverse).
  import runpy
  runpy.run_module("stable_alignment_jax.serving.cli", run_name="__main__", alter_sys=True)
