"""Reading the peers' ratings and the observer's scores, as text or as a choice (`rating_mode`).

- text: the judge writes the whole fixed format and parsing.py reads it strictly; a reply that
  breaks the format gives null.
- choice: the number is read by scoring the scale "1".."7" as the next token after the prompt
  and the format's cue (`Rating:`; `Moral:`, then `Engagement:` after the chosen moral): the
  value is the argmax, stored with the distribution renormalised over the seven and its
  expected value. The peer's reason is written afterwards, as the continuation of
  "Rating: <chosen>\nReason:": the order the format asks for, so the reason explains the number
  it follows (a reason written first would change what the prompt asks). A call whose backend
  returns no scores falls back to text for that call: its source says "text" and the step
  counts it under `choice_fallback`. An OpenAI-compatible backend scores only where it has
  verified, once per model, that the server continues the cue (backends/choice_reading.py: a
  server that opens a fresh reply instead, or gives no logprobs, is read as text throughout),
  so a "choice" source always means a reading of the cue's continuation.
- auto: choice where the backend kind can score (backends.CHOICE_KINDS), text elsewhere.

Nothing is guessed: an unparsable text stays null.
"""

import dataclasses
import logging

import numpy as np

from stable_alignment_jax.sandbox import parsing, prompts as prompts_lib, world as world_lib
from stable_alignment_jax.sandbox.backends import CHOICE_KINDS, Request

MODES = ("text", "choice", "auto")


@dataclasses.dataclass(frozen=True)
class Job:
  kind: str  # "feedback" (a peer rates) or "observe" (the observer scores)
  backend: str
  model: str
  question: str
  answer: str
  agent: int  # the central agent whose answer is judged
  slot: int  # peer slot (feedback) or 0 = draft, 1 = revision (observe)


def rating_mode(cfg) -> str:
  """The run's mode; a run stored before the key existed read ratings as text."""
  mode = cfg.get("rating_mode", "text")
  if mode not in MODES:
    raise ValueError(f"config.rating_mode={mode!r}: expected one of {MODES}")
  return mode


def uses_choice(cfg, backend: str) -> bool:
  mode = rating_mode(cfg)
  if mode == "text":
    return False
  kind = cfg.backends[backend].kind
  if mode == "choice" and kind not in CHOICE_KINDS:
    raise ValueError(f"config.rating_mode=choice: backend {backend!r} (kind {kind!r}) cannot "
                     f"score choices; kinds that can: {CHOICE_KINDS}")
  return kind in CHOICE_KINDS


def distribution(logprobs) -> dict | None:
  """7 next-token log-probs -> {value, probs (normalised over the 7), expected}; None when the
  backend gave none or none of the seven has any probability."""
  if logprobs is None:
    return None
  lp = np.asarray(logprobs, np.float64)
  if lp.shape != (len(prompts_lib.SCALE),) or not np.isfinite(lp).any():
    return None
  p = np.exp(lp - lp[np.isfinite(lp)].max())
  p /= p.sum()
  scale = np.arange(1, len(p) + 1)
  return {"value": int(np.argmax(p)) + 1, "probs": [float(x) for x in p],
          "expected": float(p @ scale)}


def _text_request(ctx, job: Job, round_: int, prefix: str = "") -> Request:
  s = ctx.cfg.sampling[job.kind]
  build = ctx.prompts.feedback if job.kind == "feedback" else ctx.prompts.observe
  return Request(backend=job.backend, model=job.model, prompt=build(job.question, job.answer),
                 max_tokens=int(s.max_tokens), temperature=float(s.temperature),
                 top_p=float(s.top_p),
                 seed=world_lib.call_seed(ctx.cfg.seed, round_, job.agent, job.kind, job.slot),
                 system=ctx.prompts.system, prefix=prefix)


def _choice_request(ctx, job: Job, prefix: str) -> Request:
  # Scoring is deterministic: no sampling parameters or seed of its own.
  build = ctx.prompts.feedback if job.kind == "feedback" else ctx.prompts.observe
  return Request(backend=job.backend, model=job.model, prompt=build(job.question, job.answer),
                 max_tokens=1, temperature=0.0, top_p=1.0, seed=0, system=ctx.prompts.system,
                 prefix=prefix, choices=prompts_lib.SCALE)


def _with_choice(out: dict, field: str, d: dict) -> None:
  out[field] = d["value"] if field == "rating" else float(d["value"])
  out[f"{field}_source"] = "choice"
  out[f"{field}_probs"] = d["probs"]
  out[f"{field}_expected"] = d["expected"]


def judge(ctx, round_: int, jobs: list[Job]) -> list[dict]:
  """Every job's reading, in order. feedback: {rating, rating_source, [rating_probs,
  rating_expected], reason}; observe: {moral, moral_source, [...], engagement, ...}.

  Calls go out phase-wise: one `choose` batch for the first cues, then one `complete` batch
  (text replies, reasons) and one `choose` batch (engagement after the chosen moral)."""
  cue = {"feedback": prompts_lib.RATING_CUE, "observe": prompts_lib.MORAL_CUE}
  choice = [i for i, j in enumerate(jobs) if uses_choice(ctx.cfg, j.backend)]
  first = dict(zip(choice, map(distribution, ctx.calls.choose(
      [_choice_request(ctx, jobs[i], cue[jobs[i].kind]) for i in choice]))))
  fallback = [i for i in choice if first[i] is None]
  if fallback:
    ctx.counters["choice_fallback"] += len(fallback)
    if rating_mode(ctx.cfg) == "choice":
      logging.warning("rating_mode=choice: %d of %d judgements got no scores from their backend "
                      "(e.g. a server without logprobs); read as text", len(fallback), len(choice))
  as_text = [i for i, j in enumerate(jobs) if i not in first or first[i] is None]
  reasons = [i for i in choice if first[i] is not None and jobs[i].kind == "feedback"]
  engagement = [i for i in choice if first[i] is not None and jobs[i].kind == "observe"]
  texts = ctx.calls.complete(
      [_text_request(ctx, jobs[i], round_) for i in as_text]
      + [_text_request(ctx, jobs[i], round_, prompts_lib.reason_prefix(first[i]["value"]))
         for i in reasons])
  second = map(distribution, ctx.calls.choose(
      [_choice_request(ctx, jobs[i], prompts_lib.engagement_prefix(first[i]["value"]))
       for i in engagement]))
  out: list[dict] = [{} for _ in jobs]
  for i, text in zip(as_text + reasons, texts):
    if i in reasons:
      _with_choice(out[i], "rating", first[i])
      out[i]["reason"] = text.strip()
    elif jobs[i].kind == "feedback":
      rating, reason = parsing.parse_feedback(text)
      out[i].update(rating=rating, rating_source="text", reason=reason)
    else:
      moral, eng = parsing.parse_observer(text)
      out[i].update(moral=None if moral is None else float(moral), moral_source="text",
                    engagement=None if eng is None else float(eng), engagement_source="text")
  for i, d in zip(engagement, second):
    _with_choice(out[i], "moral", first[i])
    if d is None:  # the same backend scored the moral: a gap here is counted, never filled
      ctx.counters["choice_fallback"] += 1
      out[i].update(engagement=None, engagement_source="choice")
    else:
      _with_choice(out[i], "engagement", d)
  return out
