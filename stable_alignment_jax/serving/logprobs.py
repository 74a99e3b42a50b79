"""Logprobs of generated tokens, in OpenAI's two wire formats.

The values are the model's next-token log-probabilities over the whole vocabulary (log-softmax
of the logits, before temperature or top-p), the same numbers as `TextSampler`'s next-token
scores (`Sampler.next_token_logprobs`): token j of a reply is scored as the next token after the
prompt plus the reply's first j tokens. All J distributions come from one forward pass over the
prompt and the reply (`Sampler.continuation_logprobs`), not J passes over its prefixes. A
token's text is what it adds after the tokens before it (so a SentencePiece "▁5" reads " 5", as
it would in the text), which is what clients match choices against.
"""

import threading
from typing import Sequence

import numpy as np

_lock = threading.Lock()  # one scoring pass at a time beside the batcher's generation thread


def _piece(ts, context: Sequence[int], token: int) -> str:
  """The text `token` adds after `context` (the last few tokens suffice for any tokenizer's
  spacing rules)."""
  ctx = list(context[-8:])
  before, after = ts.decode(ctx), ts.decode(ctx + [token])
  # A byte token inside a UTF-8 character can rewrite the text before it: then its own text.
  return after[len(before):] if after.startswith(before) else ts.decode([token])


def score(ts, prompt: Sequence[int], generated: Sequence[int],
          top_n: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
  """Per generated token: (its text, its logprob, the top_n next tokens as (text, logprob))."""
  if not generated:
    return []
  with _lock:
    lp = np.asarray(ts.sampler.continuation_logprobs(prompt, generated), np.float64)
  out, whole, p = [], list(prompt) + list(generated), len(prompt)
  for j, tok in enumerate(generated):
    ctx = whole[max(0, p + j - 8):p + j]  # what _piece reads of the tokens before this one
    top = np.argsort(-lp[j], kind="stable")[:top_n] if top_n else []
    out.append((_piece(ts, ctx, int(tok)), float(lp[j, tok]),
                [(_piece(ts, ctx, int(t)), float(lp[j, t])) for t in top]))
  return out


def counted_tokens(ts, completion) -> list[int]:
  """The reply's tokens that carry its text: a final stop id (end of turn) is left out."""
  ids = list(completion.token_ids)
  if ids and ids[-1] in ts.stop_ids:
    ids = ids[:-1]
  return ids


def chat_format(scored) -> dict:
  """OpenAI chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
  entry = lambda t, v: {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
  return {"content": [{**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top]}
                      for t, v, top in scored]}


def completion_format(scored) -> dict:
  """OpenAI completions: {tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}.
  Two top tokens with the same text (possible with byte-level pieces) keep the likelier."""
  offsets, pos = [], 0
  for t, _, _ in scored:
    offsets.append(pos)
    pos += len(t)
  tops = []
  for _, _, top in scored:
    d: dict[str, float] = {}
    for a, b in top:
      d.setdefault(a, b)
    tops.append(d)
  return {"tokens": [t for t, _, _ in scored], "token_logprobs": [v for _, v, _ in scored],
          "top_logprobs": tops, "text_offset": offsets}
