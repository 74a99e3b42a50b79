"""The in-process JAX backend: agents' prompts go through our model and `text_sampler.TextSampler`.

Every call of `complete` (one Back-Scatter phase: all drafts, or all peer ratings plus observer
scores, ...) becomes ONE `TextSampler.complete` per distinct checkpoint in it; rows carry their
own temperature/top-p/seed, so mixing roles in one batch changes nothing about any row's output.
`choose` scores the choices as the next token (`TextSampler.choice_logprobs`), one batch per
checkpoint.

Prompts: with the model's chat template (when it has one, `chat_template=auto`) a request is a
user message, after a system message when the request has one, and its `prefix` is the start
of the assistant's reply, which the model continues; without one the text is raw: system,
blank line, prompt, prefix.

A choice ("5") is scored as the token the tokenizer writes after the cue: " 5" when that is one
token after "Rating:" (BPE vocabularies), else "5" after "Rating: " (byte and SentencePiece
vocabularies split the space off); a request where neither is one token gets None (read as text).

Config (`config.backends.<name>`, kind="jax"):
  model              default checkpoint spec for every agent model name: "random:tiny[:seed]",
                     an HF LLaMA directory or one of our training run directories
  models             optional {agent model name: spec | {spec, tokenizer}}: several checkpoints
                     in one society (one sampler each)
  tokenizer          optional; default: the run's `data.tokenizer`, the HF directory itself, or
                     "byte" for a random model
  chat_template      auto (the model's own template when it has one, else raw text) | none (raw
                     text) | model (its own, or an error) | a chat_templates.py name or .json
  dtype              compute dtype override ("" = the checkpoint's)
  cache_dtype        KV cache dtype ("" = the compute dtype; "bfloat16" halves decode's reads)
  max_prompt_tokens  prompts longer than this keep their last tokens (BOS stays first)
  mesh               {data, fsdp, tensor} sizes (default fsdp over all devices)
  devices            0 = all devices, n = the first n (a tiny model gains nothing from 8)
  min_batch          pad every batch to at least this many rows
  batch_buckets      optional powers of two: a call's rows are padded to the smallest bucket
                     that holds them (each batch the sampler forms from the call, too), so the
                     set of compiled batch shapes stays that small set; sized from the phases'
                     real row counts (configs/sandbox.py:phase_buckets) they waste few rows.
                     A call larger than every bucket falls back to `min_batch`'s power of two.
"""

import asyncio
import collections
import threading

import numpy as np

from stable_alignment_jax.contracts import bucket
from stable_alignment_jax.sampling.generate import SamplingParams

RAW = ("none", "raw")


class _Model:
  """One checkpoint: its TextSampler and how requests become its prompts."""

  def __init__(self, spec: str, tok, chat_template: str, dtype, mesh, min_batch: int,
               max_prompt_tokens: int, cache_dtype: str | None = None):
    from stable_alignment_jax.checkpoints import run_dir as checkpoints
    from stable_alignment_jax.sampling.text_sampler import TextSampler
    self.spec = spec
    self.chat = chat_template not in RAW and not (chat_template == "auto"
                                                  and tok.chat_template is None)
    graphdef, state = checkpoints.load_model(spec, dtype=dtype, mesh=mesh)
    self.ts = TextSampler(graphdef, state, tok, mesh=mesh,
                          chat_template=chat_template if self.chat else "auto",
                          min_batch=min_batch, max_prompt_tokens=max_prompt_tokens, name=spec,
                          cache_dtype=cache_dtype)
    self.stop = tuple(self.ts.template.stop) if self.chat else ()
    self.min_batch = min_batch
    # The sampler's batch floor is set per call (`padded`): one call at a time per model.
    self.lock = threading.Lock()

  def padded(self, rows: int, buckets: tuple[int, ...]) -> int:
    """Pad a call of `rows` rows to its bucket: every batch the sampler makes of it uses it."""
    b = next((b for b in buckets if b >= rows), self.min_batch)
    self.ts.sampler.min_batch = b
    return bucket(rows, b)

  @property
  def sampler(self):
    """The underlying `generate.Sampler` (benchmarks re-issue its batches directly)."""
    return self.ts.sampler

  def prompt(self, r, extra_prefix: str = ""):
    prefix = r.prefix + extra_prefix
    if not self.chat:
      return (f"{r.system}\n\n" if r.system else "") + r.prompt + prefix
    msgs = [{"role": "system", "content": r.system}] if r.system else []
    msgs.append({"role": "user", "content": r.prompt})
    if prefix:
      msgs.append({"role": "assistant", "content": prefix})
    return msgs

  def text(self, prompt) -> str:
    return prompt if isinstance(prompt, str) else self.ts.render(prompt)

  def choice_prompt(self, r):
    """(prompt, choices as written) for a choice request, or None when no form is one token."""
    forms = (("", [" " + c for c in r.choices]), (" ", list(r.choices)))
    for cue_space, written in forms:
      p = self.prompt(r, cue_space)
      text = self.text(p)
      ids = self.ts.encode(text)
      try:
        for c in written:
          self.ts.choice_token(ids, text, c)
      except ValueError:
        continue
      return p, written
    return None


class JaxBackend:

  def __init__(self, name: str, cfg, model_names=None):
    """`model_names`: the agent/observer model names this backend will serve; each is checked
    and only their checkpoints are loaded (all configured ones when None)."""
    from stable_alignment_jax.model import sharding
    from stable_alignment_jax.sampling.text_sampler import load_spec_tokenizer, resolve_template
    import jax
    self.name = name
    self.default_spec = cfg.get("model", "") or ""
    max_prompt_tokens = int(cfg.get("max_prompt_tokens", 1024))
    if max_prompt_tokens < 2:
      raise ValueError(f"config.backends.{name}.max_prompt_tokens must be >= 2")
    chat_template = cfg.get("chat_template", "auto") or "auto"
    tokenizer = cfg.get("tokenizer", "") or ""
    dtype = cfg.get("dtype", "") or None
    self.entries = {}  # agent model name -> (spec, tokenizer)
    for model_name, e in dict(cfg.get("models", None) or {}).items():
      if isinstance(e, str):
        self.entries[model_name] = (e, tokenizer)
      elif hasattr(e, "get"):
        if "spec" not in e:
          raise KeyError(f"config.backends.{name}.models.{model_name}: missing `spec`")
        self.entries[model_name] = (e["spec"], e.get("tokenizer", "") or tokenizer)
      else:
        raise TypeError(f"config.backends.{name}.models.{model_name}: expected a checkpoint spec "
                        f"or {{spec, tokenizer}}, got {type(e).__name__}")
    if not self.entries and not self.default_spec:
      raise KeyError(f"config.backends.{name}: give `model` (a checkpoint spec) or `models`")
    if model_names is None:
      wanted = set(self.entries.values()) | ({(self.default_spec, tokenizer)}
                                             if self.default_spec else set())
    else:  # names first: an unknown one fails before any checkpoint is read
      wanted = {self.entries.get(m, (self.spec_of(m), tokenizer)) for m in model_names}
    specs = [spec for spec, _ in wanted]
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
      raise ValueError(f"config.backends.{name}: checkpoint(s) {twice} listed with different "
                       "tokenizers")
    devices = int(cfg.get("devices", 0))
    mesh_sizes = dict(cfg.get("mesh", None) or {"fsdp": -1})
    self.mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:devices] if devices > 0 else None)
    min_batch = int(cfg.get("min_batch", 1))
    buckets = tuple(sorted(int(b) for b in (cfg.get("batch_buckets", None) or ())))
    if any(b < 1 or b & (b - 1) for b in buckets):
      raise ValueError(f"config.backends.{name}.batch_buckets={list(buckets)}: the sampler pads "
                       "batches to powers of two; give powers of two")
    self.batch_buckets = buckets
    # Resolve every tokenizer and template (which checks every checkpoint path) before loading
    # anything: a missing directory or a wrong tokenizer fails before the run.
    toks = {spec: load_spec_tokenizer(spec, tok) for spec, tok in sorted(wanted)}
    if chat_template not in RAW:
      for t in toks.values():
        resolve_template(chat_template, t)
    self.models: dict[str, _Model] = {
        spec: _Model(spec, tok, chat_template, dtype, self.mesh, min_batch, max_prompt_tokens,
                     cfg.get("cache_dtype", "") or None)
        for spec, tok in toks.items()}
    self.counters = collections.Counter()

  def spec_of(self, model_name: str) -> str:
    if model_name in self.entries:
      return self.entries[model_name][0]
    if self.default_spec:
      return self.default_spec
    raise KeyError(f"backend {self.name}: agent model {model_name!r} is not in "
                   f"config.backends.{self.name}.models ({sorted(self.entries)}) and there is "
                   "no default `model`")

  def _groups(self, reqs) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
      groups.setdefault(self.spec_of(r.model), []).append(i)
    return groups

  def generate_sync(self, reqs) -> list[str]:
    """One `TextSampler.complete` per checkpoint over all requests; texts in request order."""
    out = [""] * len(reqs)
    for spec, idx in self._groups(reqs).items():
      m = self.models[spec]
      params = [SamplingParams(max_new_tokens=reqs[i].max_tokens,
                               temperature=reqs[i].temperature, top_p=reqs[i].top_p,
                               seed=reqs[i].seed) for i in idx]
      with m.lock:
        self.counters["batch_rows"] += m.padded(len(idx), self.batch_buckets)
        done = m.ts.complete([m.prompt(reqs[i]) for i in idx], params, stop=list(m.stop))
      self.counters["generate_calls"] += 1
      self.counters["generated_tokens"] += sum(c.completion_tokens for c in done)
      self.counters["prompts_truncated"] += sum(c.truncated for c in done)
      for i, c in zip(idx, done):
        out[i] = c.text
    self.counters["calls"] += len(reqs)
    return out

  def choose_sync(self, reqs) -> list[list[float] | None]:
    """Log-probabilities of each request's choices as the next token; one scoring pass per
    checkpoint and choice spelling."""
    out: list[list[float] | None] = [None] * len(reqs)
    for spec, idx in self._groups(reqs).items():
      m = self.models[spec]
      forms: dict[tuple, list[tuple[int, object]]] = {}
      for i in idx:
        got = m.choice_prompt(reqs[i])
        if got is None:
          self.counters["choice_not_one_token"] += 1
          continue
        forms.setdefault(tuple(got[1]), []).append((i, got[0]))
      for choices, rows in forms.items():
        with m.lock:
          self.counters["batch_rows"] += m.padded(len(rows), self.batch_buckets)
          lp = m.ts.choice_logprobs([p for _, p in rows], list(choices))
        self.counters["choice_calls"] += 1
        for (i, _), row in zip(rows, np.asarray(lp, np.float64)):
          out[i] = [float(x) for x in row]
    self.counters["calls"] += len(reqs)
    return out

  async def complete(self, reqs) -> list[str]:
    # In a thread: HTTP backends of the same phase keep running while the model computes.
    return await asyncio.to_thread(self.generate_sync, list(reqs))

  async def choose(self, reqs) -> list[list[float] | None]:
    return await asyncio.to_thread(self.choose_sync, list(reqs))
