"""The paper's three kinds of alignment examples from SANDBOX records (DESIGN.md "Alignment data").

- imitation: prompt = the question; responses = every answer given to it (drafts and revisions,
  across agents and runs), rated by the observer's moral score.
- self_critic: prompt = the question + a critique instruction + one draft; responses = the peers'
  written reasons, each behind "Critique: ", rated by the peers' ratings. The prefix is ours,
  not the paper's: a reason alone ("It avoids the question.") reads like an answer, so without
  it neither the model nor eval (eval/answer_format.py) could tell a critique from an answer.
- realignment, as the authors' release builds it (agi-templar/Stable-Alignment,
  collect_data.py; the default form, "per_reason"): the instruction is the question, a space,
  the draft, then a request to comment and revise (`REVISE_REQUEST`), with no input block;
  one response per peer whose rating is not null and whose reason is not empty: that reason,
  " Here is the revised response: ", the revision; every response rated by the revision's moral
  score, and grouped per prompt, so an example holds K responses (one per peer). Kept only when
  the revision scored strictly higher than the draft AND strictly above 4 (a revision scored
  exactly 4 is not kept). The authors' request reads "Please first common on this response";
  ours says "comment". The form "bulleted" (dataset versions before 1.3.0) is a named option:
  the question and draft in an input block under `REVISE_INSTRUCTION`, and one response that
  lists every reason under "Feedback:" before the marker and the revision (K = 1).

Prompts use the Alpaca layout (`prompt`); the same prompt is also kept as a chat user turn
(`turns`: the instruction, a blank line, the input), so training can render it with a chat
model's own template instead (`data.prompt_format`). Examples with the same prompt are grouped
into one example with K rated responses; a response text seen twice under one prompt is kept
once with its mean rating (otherwise the contrastive loss would compare a text with itself). A
score that is null is never guessed: the answer, peer or record that needs it is left out and
counted under a named reason.
"""

import collections
import hashlib
from typing import Iterable

# The kinds, Alpaca's layouts and the markers are shared contracts (eval reads the same ones).
from stable_alignment_jax.contracts import (  # noqa: F401 - re-exported for data_prep's users
    ALPACA_NO_INPUT, ALPACA_WITH_INPUT, CRITIQUE_PREFIX, FEEDBACK_HEADER, KINDS, REVISED_MARKER,
    alpaca_prompt)

CRITIQUE_INSTRUCTION = ("Critique the answer below to the given question: judge whether it is "
                        "socially aligned (honest, harmless and helpful) and explain why.")
REVISE_INSTRUCTION = ("The answer below to the given question received feedback from others. "
                      "Restate the feedback, then revise the answer so that it is more socially "
                      "aligned.")
# The critique and revise prompts' input: the question and the draft being judged.
JUDGED = "Question: {question}\nAnswer: {answer}"
# The authors' request after the question and draft (their "common" spelled "comment").
REVISE_REQUEST = ("Please first comment on this response, and then revise it to make it better "
                  "aligned with shared social values.")
REALIGNMENT_FORMS = ("per_reason", "bulleted")
REALIGN_MIN_SCORE = 4.0  # the revision must score above this (paper: "above 4")


def user_turn(instruction: str, input_text: str | None = None) -> str:
  """The words of an Alpaca prompt without its preamble and headers: a chat user message."""
  return instruction if input_text is None else f"{instruction}\n\n{input_text}"


def _judged(question: str, draft: str) -> str:
  return JUDGED.format(question=question, answer=draft)


def critique_prompt(question: str, draft: str) -> str:
  return alpaca_prompt(CRITIQUE_INSTRUCTION, _judged(question, draft))


def revise_prompt(question: str, draft: str) -> str:
  return alpaca_prompt(REVISE_INSTRUCTION, _judged(question, draft))


def critique_response(reason: str) -> str:
  return f"{CRITIQUE_PREFIX} {reason.strip()}"


def revise_request(question: str, draft: str) -> str:
  """The authors' realignment instruction: question, draft and request as one instruction."""
  return f"{question.strip()} {draft.strip()} {REVISE_REQUEST}"


def reason_then_revision(reason: str, revision: str) -> str:
  """One per-reason realignment response (the authors' form)."""
  return f"{reason.strip()} {REVISED_MARKER} {revision.strip()}"


def realignment_response(reasons: list[str], revision: str) -> str:
  """The "bulleted" form's one response: every reason, then the marker and the revision."""
  feedback = "\n".join(f"- {r.strip()}" for r in reasons)
  return f"{FEEDBACK_HEADER}\n{feedback}\n\n{REVISED_MARKER}\n{revision}"


def record_source(rec: dict) -> str:
  return f"{rec['run_id']}/{rec['agent_model']}"


class _Groups:
  """Rated responses grouped by prompt, in first-seen order; repeated texts keep their mean."""

  def __init__(self, kind: str):
    self.kind = kind
    self.groups: dict[str, dict] = {}
    self.merged = 0

  def add(self, prompt: str, turn: str, question: str, response: str, rating: float,
          source: str):
    g = self.groups.setdefault(prompt, {"question": question, "turns": [turn],
                                        "responses": {}, "sources": {}})
    g["sources"][source] = None
    if response in g["responses"]:
      self.merged += 1
    g["responses"].setdefault(response, []).append(rating)

  def examples(self) -> list[dict]:
    out = []
    for prompt, g in self.groups.items():
      out.append({"prompt": prompt, "responses": list(g["responses"]),
                  "ratings": [sum(r) / len(r) for r in g["responses"].values()],
                  "stage": self.kind, "source": ",".join(g["sources"]),
                  "turns": g["turns"], "question": g["question"]})
    return out


def imitation_examples(records: Iterable[dict], drops: collections.Counter) -> list[dict]:
  groups = _Groups("imitation")
  for rec in records:
    for which in ("draft", "revised"):
      ans = rec[which]
      if ans["moral"] is None:
        drops[f"imitation: {which} moral score is null"] += 1
        continue
      groups.add(alpaca_prompt(rec["question"]), user_turn(rec["question"]), rec["question"],
                 ans["text"], ans["moral"], record_source(rec))
  drops["imitation: repeated answer merged"] += groups.merged
  return groups.examples()


def self_critic_examples(records: Iterable[dict], drops: collections.Counter) -> list[dict]:
  groups = _Groups("self_critic")
  for rec in records:
    rated = [fb for fb in rec["feedback"] if fb["rating"] is not None]
    drops["self_critic: peer rating is null"] += len(rec["feedback"]) - len(rated)
    written = [fb for fb in rated if fb["reason"].strip()]
    drops["self_critic: peer reason is empty"] += len(rated) - len(written)
    if not written:
      drops["self_critic: record without a rated peer reason"] += 1
      continue
    prompt = critique_prompt(rec["question"], rec["draft"]["text"])
    turn = user_turn(CRITIQUE_INSTRUCTION, _judged(rec["question"], rec["draft"]["text"]))
    for fb in written:
      groups.add(prompt, turn, rec["question"], critique_response(fb["reason"]), fb["rating"],
                 record_source(rec))
  drops["self_critic: repeated reason merged"] += groups.merged
  return groups.examples()


def realignment_examples(records: Iterable[dict], drops: collections.Counter,
                         form: str = "per_reason") -> list[dict]:
  if form not in REALIGNMENT_FORMS:
    raise ValueError(f"realignment form {form!r}: expected one of {REALIGNMENT_FORMS}")
  groups = _Groups("realignment")
  for rec in records:
    before, after = rec["draft"]["moral"], rec["revised"]["moral"]
    if before is None or after is None:
      drops["realignment: draft or revision moral score is null"] += 1
      continue
    if not after > before:
      drops["realignment: revision not scored higher than draft"] += 1
      continue
    if not after > REALIGN_MIN_SCORE:
      drops["realignment: revision not scored above 4"] += 1
      continue
    rated = [fb for fb in rec["feedback"] if fb["rating"] is not None]
    drops["realignment: peer rating is null"] += len(rec["feedback"]) - len(rated)
    reasons = [fb["reason"] for fb in rated if fb["reason"].strip()]
    drops["realignment: peer reason is empty"] += len(rated) - len(reasons)
    if not reasons:
      drops["realignment: no rated feedback to restate"] += 1
      continue
    question, draft, revision = rec["question"], rec["draft"]["text"], rec["revised"]["text"]
    if form == "bulleted":
      groups.add(revise_prompt(question, draft), user_turn(REVISE_INSTRUCTION,
                                                           _judged(question, draft)),
                 question, realignment_response(reasons, revision), after, record_source(rec))
      continue
    instruction = revise_request(question, draft)
    for reason in reasons:
      groups.add(alpaca_prompt(instruction), user_turn(instruction), question,
                 reason_then_revision(reason, revision), after, record_source(rec))
  drops["realignment: repeated revision merged"] += groups.merged
  return groups.examples()


BUILDERS = {"imitation": imitation_examples, "self_critic": self_critic_examples,
            "realignment": realignment_examples}


def build_examples(records: list[dict], realignment_form: str = "per_reason"
                   ) -> tuple[dict[str, list[dict]], collections.Counter]:
  """All three kinds from the same records, and the counted reasons for what was left out."""
  drops: collections.Counter = collections.Counter()
  examples = {kind: BUILDERS[kind](records, drops) for kind in KINDS if kind != "realignment"}
  examples["realignment"] = realignment_examples(records, drops, realignment_form)
  examples = {kind: examples[kind] for kind in KINDS}
  return examples, +drops  # `+` drops zero counts


def parse_ratio(text: str) -> dict[str, float]:
  """"5:1:1" -> {imitation: 5, self_critic: 1, realignment: 1} (order of KINDS)."""
  parts = text.split(":")
  if len(parts) != len(KINDS):
    raise ValueError(f"ratio {text!r}: expected {len(KINDS)} numbers a:b:c for {KINDS}")
  try:
    values = [float(p) for p in parts]
  except ValueError:
    raise ValueError(f"ratio {text!r}: not numbers") from None
  if any(v < 0 for v in values) or not any(values):
    raise ValueError(f"ratio {text!r}: needs non-negative numbers, not all zero")
  return dict(zip(KINDS, values))


def _stable_key(seed: int, text: str) -> str:
  return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def apply_ratio(examples: dict[str, list[dict]], ratio: dict[str, float], seed: int,
                drops: collections.Counter) -> dict[str, list[dict]]:
  """Subsample kinds so their counts are proportional to `ratio`, keeping as many as possible.

  The scale is the largest one every kind can afford (min of available / weight); which examples
  stay is decided by a seeded hash of the prompt, so it does not depend on input order.
  """
  scale = min(len(examples[k]) / w for k, w in ratio.items() if w > 0)
  out = {}
  for kind, exs in examples.items():
    keep = int(scale * ratio[kind] + 1e-9)
    ranked = sorted(exs, key=lambda e: _stable_key(seed, e["prompt"]))[:keep]
    kept = {id(e) for e in ranked}
    out[kind] = [e for e in exs if id(e) in kept]  # keep the original order
    if len(exs) > keep:
      drops[f"{kind}: left out by the sampling ratio"] += len(exs) - keep
  return out


def split_of(question: str, validation_percent: float) -> str:
  """train/validation by a hash of the question, so a question never crosses splits (any kind)."""
  bucket = int(hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:8], 16) % 10000
  return "validation" if bucket < validation_percent * 100 else "train"
