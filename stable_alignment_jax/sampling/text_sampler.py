"""Strings in, strings out: one sampler over a checkpoint for the server, the CLI, eval and SANDBOX.

`TextSampler` wraps `generate.Sampler` with what every caller needs around it and used to write
itself: the tokenizer and its BOS policy, the chat template, the stop ids, and the prompt budget.

- A prompt is raw text (`str`), OpenAI-style messages (`list[dict]`, rendered by the chat
  template), or token ids (`list[int]`, taken as they are, as OpenAI's /v1/completions allows).
- Text gets BOS when the tokenizer's `add_bos` says so; a rendered template that already starts
  with BOS's text (LLaMA-3's `<|begin_of_text|>`) gets exactly one.
- Budget: the sampler rounds prompt length and new-token count up to powers of two and needs
  their sum within the context. A prompt longer than it may be keeps its end (the question and
  the answer cue), with BOS kept first; such prompts are marked `truncated`. Rows whose shapes
  cannot share one sampler call go into separate calls (in order), so a row's output never
  depends on the other rows.
- Output (OpenAI semantics): a stop id ends a completion and is not in the text; stop strings
  are applied after decoding (the text is cut before the earliest one); `finish_reason` is "stop"
  or "length".
- Chat template choice: "auto" (the checkpoint's own jinja template when it has one, else
  Alpaca), "model" (its own, or an error), or a hand-written one of chat_templates.py by name
  or .json path (the paper's Alpaca layout; the fallback for tiny/random models).
"""

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from stable_alignment_jax.contracts import bucket
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.data import chat_templates as templates

Prompt = str | Sequence[dict] | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  token_ids: list[int]  # the new tokens that count: through the stop id or the stop string
  finish_reason: str  # "stop" (stop id or stop string) | "length" (max_new_tokens reached)
  prompt_tokens: int
  truncated: bool = False  # the prompt lost its beginning to fit the context

  @property
  def completion_tokens(self) -> int:
    return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class Row:
  """One prepared request: prompt ids (BOS and truncation done), sampling params, stop strings."""
  ids: list[int]
  params: SamplingParams
  stop: tuple[str, ...] = ()
  truncated: bool = False


@dataclasses.dataclass(frozen=True)
class Delta:
  """A streamed row's new text; `done` is its Completion on the step it finished, else None."""
  text: str
  done: Completion | None = None


class ContextError(ValueError):
  """A prompt (plus the tokens asked for) does not fit the model's context."""


class ModelTemplate:
  """The checkpoint's own jinja chat template, rendered by transformers. It needs no stop
  strings: its end-of-turn token is among the tokenizer's stop ids."""

  name = "model"
  stop: tuple[str, ...] = ()

  def __init__(self, tok):
    self.tok = tok

  def render(self, messages: Sequence[dict]) -> str:
    from stable_alignment_jax.data.tokenizer import render_chat
    msgs = templates.normalize(messages)
    continuing = msgs[-1]["role"] == "assistant"
    return render_chat(self.tok, msgs, add_generation_prompt=not continuing,
                       continue_final_message=continuing)


def resolve_template(choice: str, tok):
  """A template object (`.render(messages) -> str`, `.stop`) for a chat_template choice."""
  if choice in ("auto", "model"):
    if tok.chat_template is not None:
      return ModelTemplate(tok)
    if choice == "model":
      raise ValueError(f"chat_template='model': tokenizer {getattr(tok, 'path', '')!r} has no "
                       "chat template (no chat_template.jinja, no chat_template key in "
                       "tokenizer_config.json)")
    choice = "alpaca"
  return templates.load_template(choice)


def default_tokenizer(spec: str) -> str:
  """The tokenizer a checkpoint spec implies: 'byte' for random:*, an HF directory (or hub id)
  itself, a run directory's `data.tokenizer`."""
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  if spec.startswith("random:"):
    return "byte"  # a random model has no tokenizer of its own
  path = os.path.expanduser(spec)
  if not os.path.isdir(path):
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
      return spec  # a hub id: the tokenizer files come with their own download
    raise FileNotFoundError(f"model checkpoint not found: {spec} (expected random:<preset>, an "
                            "HF LLaMA directory or hub id, or a run directory)")
  if checkpoints.is_hf_dir(path):
    return path
  try:
    run = checkpoints.read_run_config(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{spec}: neither an HF LLaMA directory (config.json) nor a run "
                            f"directory ({checkpoints.RUN_CONFIG})") from None
  name = run.get("data", {}).get("tokenizer")
  if not name:
    raise ValueError(f"{spec}/{checkpoints.RUN_CONFIG}: no data.tokenizer; pass a tokenizer")
  return name


def load_spec_tokenizer(spec: str, tokenizer: str = ""):
  """The tokenizer a caller names (`~` expanded), else the one checkpoint `spec` implies
  (`default_tokenizer`), loaded: what the sampler, the sandbox's JAX backend and eval use."""
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  return load_tokenizer(os.path.expanduser(tokenizer or default_tokenizer(spec)))


def _pow2_floor(n: int) -> int:
  return 1 << (n.bit_length() - 1) if n >= 1 else 0


class TextSampler:

  def __init__(self, graphdef, state, tokenizer, *, mesh=None, chat_template: str = "auto",
               min_batch: int = 1, max_prompt_tokens: int = 0, name: str = "",
               cache_dtype: str | None = None):
    self.tokenizer = tok = tokenizer
    self.template = resolve_template(chat_template, tok)
    self.stop_ids = list(tok.stop_ids)
    self.max_prompt_tokens, self.name = max_prompt_tokens, name
    # cache_dtype "bfloat16": the KV cache in 16 bits (half the bytes a decode step reads).
    self.sampler = Sampler(graphdef, state, eos_id=self.stop_ids, pad_id=tok.pad_id, mesh=mesh,
                           min_batch=min_batch, cache_dtype=cache_dtype)
    self.context = self.sampler.cfg.max_seq_len
    if tok.vocab_size > self.sampler.cfg.vocab_size:
      raise ValueError(f"tokenizer {getattr(tok, 'path', '')!r} has {tok.vocab_size} ids but the "
                       f"model {name!r} only {self.sampler.cfg.vocab_size}: they do not belong "
                       "together (pass the tokenizer it was trained with)")

  @classmethod
  def load(cls, spec: str, *, tokenizer: str = "", dtype: str | None = None, mesh=None,
           chat_template: str = "auto", min_batch: int = 1,
           max_prompt_tokens: int = 0, cache_dtype: str | None = None) -> "TextSampler":
    """A sampler over `checkpoints.load_model(spec)`; the tokenizer defaults to the checkpoint's
    own (see `default_tokenizer`). Tokenizer and template are checked before the weights load."""
    from stable_alignment_jax.checkpoints import run_dir as checkpoints
    from stable_alignment_jax.model import sharding
    tok = load_spec_tokenizer(spec, tokenizer)
    resolve_template(chat_template, tok)
    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    graphdef, state = checkpoints.load_model(spec, dtype=dtype, mesh=mesh)
    return cls(graphdef, state, tok, mesh=mesh, chat_template=chat_template, min_batch=min_batch,
               max_prompt_tokens=max_prompt_tokens, name=spec, cache_dtype=cache_dtype)

  # -- prompts -----------------------------------------------------------------------------------
  def render(self, messages: Sequence[dict]) -> str:
    return self.template.render(messages)

  def encode(self, text: str) -> list[int]:
    """Text as prompt ids under the tokenizer's BOS policy; BOS written by a chat template as
    text becomes the BOS id, never a second one."""
    tok = self.tokenizer
    if tok.bos_text and text.startswith(tok.bos_text):
      return tok.encode(text[len(tok.bos_text):], bos=True)
    return tok.encode(text, bos=tok.add_bos)

  def prompt_ids(self, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
      return self.encode(prompt)
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
      return self.encode(self.render(prompt))
    if prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
      return [int(t) for t in prompt]
    raise ValueError("a prompt is a string, a list of messages (dicts) or a list of token ids; "
                     f"got {type(prompt).__name__} of {len(prompt)} items")

  def prompt_budget(self, max_new_tokens: int | None) -> int:
    """Longest prompt that fits the context beside `max_new_tokens` (None: a next-token query,
    no decoding; the sampler keeps room for at least one new token otherwise)."""
    new = 0 if max_new_tokens is None else bucket(max_new_tokens, 1)
    limit = _pow2_floor(self.context - new)
    if limit < self.sampler.min_prompt:
      raise ContextError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model context of {self.context} tokens")
    return min(limit, self.max_prompt_tokens) if self.max_prompt_tokens > 0 else limit

  def max_new_tokens(self, prompt_len: int) -> int:
    """The most new tokens a prompt of this length may ask for (0 if it alone is too long)."""
    room = self.context - bucket(prompt_len, self.sampler.min_prompt)
    return _pow2_floor(room)

  def fit(self, ids: list[int], limit: int) -> tuple[list[int], bool]:
    """`ids` cut to `limit` tokens: the end kept, BOS (when first) kept in front."""
    if len(ids) <= limit:
      return ids, False
    if ids[0] == self.tokenizer.bos_id and limit >= 2:
      return [ids[0]] + ids[len(ids) - limit + 1:], True
    return ids[len(ids) - limit:], True

  def prepare(self, prompt: Prompt, params: SamplingParams, stop: Sequence[str] = (), *,
              truncate: bool = True) -> Row:
    """One row; a prompt over budget keeps its end, or raises ContextError if not `truncate`."""
    ids = self.prompt_ids(prompt)
    if not ids:
      raise ValueError("empty prompt: it encodes to no tokens")
    limit = self.prompt_budget(params.max_new_tokens)
    if len(ids) > limit and not truncate:
      raise ContextError(f"the prompt has {len(ids)} tokens; with max_tokens="
                         f"{params.max_new_tokens} this model's context of {self.context} "
                         f"tokens allows at most {limit} (prompts are padded to a power of two)")
    ids, cut = self.fit(ids, limit)
    return Row(ids, params, tuple(s for s in stop if s), cut)

  def _rows(self, prompts, params, stop) -> list[Row]:
    n = len(prompts)
    params = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(params) != n:
      raise ValueError(f"{n} prompts but {len(params)} sampling params")
    if isinstance(stop, str):
      stop = [stop]
    stops = list(stop) if stop and not isinstance(stop[0], str) else [stop] * n
    if len(stops) != n:
      raise ValueError(f"{n} prompts but {len(stops)} stop lists")
    return [self.prepare(p, sp, s) for p, sp, s in zip(prompts, params, stops)]

  def _groups(self, rows: Sequence[Row]) -> list[list[int]]:
    """Row indices split, in order, into sampler calls whose padded shapes fit the context."""
    groups, p, new = [], 0, 0
    for i, r in enumerate(rows):
      rp = bucket(len(r.ids), self.sampler.min_prompt)
      rn = bucket(r.params.max_new_tokens, 1)
      if groups and max(p, rp) + max(new, rn) <= self.context:
        groups[-1].append(i)
        p, new = max(p, rp), max(new, rn)
      else:
        groups.append([i])
        p, new = rp, rn
    return groups

  # -- output ------------------------------------------------------------------------------------
  def decode(self, ids: Sequence[int]) -> str:
    # A model vocabulary padded beyond the tokenizer's can emit ids that carry no text.
    return self.tokenizer.decode([i for i in ids if 0 <= i < self.tokenizer.vocab_size])

  def _finish(self, row: Row, ids: Sequence[int]) -> tuple[Completion, bool]:
    """The completion of a row's new tokens so far, and whether a stop string ended it."""
    ids = list(ids)
    if ids and ids[-1] in self.stop_ids:
      reason, body = "stop", ids[:-1]
    else:
      reason, body = ("length" if len(ids) >= row.params.max_new_tokens else "stop"), ids
    text = self.decode(body)
    cut = min(((text.find(s), s) for s in row.stop if s in text), default=None)
    if cut is None:
      return Completion(text, ids, reason, len(row.ids), row.truncated), False
    idx, s = cut
    # Count the tokens up to the one that completed the stop string.
    k = next((k for k in range(1, len(body) + 1)
              if len(self.decode(body[:k])) >= idx + len(s)), len(body))
    return Completion(text[:idx], body[:k], "stop", len(row.ids), row.truncated), True

  # -- generating --------------------------------------------------------------------------------
  def complete_rows(self, rows: Sequence[Row]) -> list[Completion]:
    out: list[Completion | None] = [None] * len(rows)
    for group in self._groups(rows):
      new = self.sampler.generate([rows[i].ids for i in group], [rows[i].params for i in group])
      for i, ids in zip(group, new):
        out[i] = self._finish(rows[i], ids)[0]
    return out

  def stream_rows(self, rows: Sequence[Row], chunk: int = 8) -> Iterator[list[Delta]]:
    """Per `chunk` decode steps, one Delta per row (see `stream`)."""
    progress = [_Progress(self, r) for r in rows]
    for group in self._groups(rows):
      for cumulative in self.sampler.stream([rows[i].ids for i in group],
                                            [rows[i].params for i in group], chunk=chunk):
        deltas = [Delta("")] * len(rows)
        for i, ids in zip(group, cumulative):
          deltas[i] = progress[i].update(ids)
        yield deltas
      if any(not progress[i].finished for i in group):  # the sampler's last yield is final
        yield [progress[i].update(None) if i in group else Delta("") for i in range(len(rows))]

  def complete(self, prompts: Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
               stop: Sequence[str] | Sequence[Sequence[str]] = ()) -> list[Completion]:
    """One Completion per prompt; `stop`: strings for every row, or one list per row."""
    return self.complete_rows(self._rows(list(prompts), params, stop))

  def stream(self, prompts: Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             stop: Sequence[str] | Sequence[Sequence[str]] = (),
             chunk: int = 8) -> Iterator[list[Delta]]:
    """As `complete`, but yields after every `chunk` decode steps one Delta per row: the text
    that became certain (held back: an incomplete UTF-8 character, a possible stop-string
    start). A row's deltas concatenate to its completion text; its last carries `done`."""
    return self.stream_rows(self._rows(list(prompts), params, stop), chunk)

  # -- scoring -----------------------------------------------------------------------------------
  def choice_token(self, ids: list[int], text: str, choice: str) -> int:
    """The id of `choice` as the tokenizer writes it after this prompt: `text + choice` must
    encode as the prompt's ids plus exactly one token (so after "Rating:" the choice "3" is
    the token of "3" there, and " 3" that of " 3")."""
    full = self.encode(text + choice)
    if len(full) != len(ids) + 1 or full[:len(ids)] != ids:
      raise ValueError(f"choice {choice!r} is not a single token after the prompt "
                       f"(prompt + choice encodes as {len(full) - len(ids):+d} tokens, ending "
                       f"{full[-3:]}); give choices that are one token where they stand")
    return full[-1]

  def choice_logprobs(self, prompts: Sequence[str | Sequence[dict]],
                      choices: Sequence[str]) -> np.ndarray:
    """[n, C] log-probability (over the whole vocabulary) of each choice as the next token."""
    limit = self.prompt_budget(None)
    rows, token_ids = [], []
    for p in prompts:
      text = p if isinstance(p, str) else self.render(p)
      ids = self.encode(text)
      token_ids.append(tuple(self.choice_token(ids, text, c) for c in choices))
      rows.append(self.fit(ids, limit)[0])
    out = np.zeros((len(rows), len(choices)), np.float32)
    by_ids: dict[tuple, list[int]] = {}
    for i, t in enumerate(token_ids):
      by_ids.setdefault(t, []).append(i)
    for t, idx in by_ids.items():
      out[idx] = self.sampler.next_token_logprobs([rows[i] for i in idx], list(t))
    return out


class _Progress:
  """A streamed row: what has been sent, and whether it has finished."""

  def __init__(self, ts: TextSampler, row: Row):
    self.ts, self.row, self.sent, self.finished, self.ids = ts, row, "", False, []

  def update(self, ids: Sequence[int] | None) -> Delta:
    """New tokens so far (None: the sampler is done with this row)."""
    if self.finished:
      return Delta("")
    if ids is not None:
      self.ids = list(ids)
    c, hit = self.ts._finish(self.row, self.ids)
    done = (ids is None or hit or len(self.ids) >= self.row.params.max_new_tokens
            or bool(self.ids and self.ids[-1] in self.ts.stop_ids))
    if done:
      self.finished = True
      return Delta(c.text[len(self.sent):], c)
    safe = _safe_prefix(c.text, self.row.stop)
    if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
      return Delta("")
    delta, self.sent = safe[len(self.sent):], safe
    return Delta(delta)


def _safe_prefix(text: str, stop: Sequence[str]) -> str:
  """`text` without what may still change: an incomplete character at the end (U+FFFD), and a
  tail that could be the start of a stop string."""
  text = text.rstrip("\ufffd")
  hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
  return text[:len(text) - hold]
