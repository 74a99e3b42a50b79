"""Does a generated reply ANSWER the question, or critique, or list feedback, or echo the prompt?

A model trained on self-critic targets can learn to critique whatever it is asked, and one
trained on realignment targets to restate feedback instead of answering; judge ratings and MC
accuracies do not show that. The shapes are told apart by the markers of our own training data
(`data_prep/alignment_examples.py`, imported, never retyped), not by phrases seen in one run.
Rules, in this order, on the reply with surrounding whitespace removed:

1. "empty": nothing left.
2. "echo": it contains a marker of our prompts, which an answer never needs: an Alpaca header
   line ("### Instruction:", "### Input:", "### Response:"), the start of the Alpaca preamble,
   of the critique instruction or of the revise instruction, or the judged-answer block of the
   critique/revise input ("Question: ..." then a line "Answer: ...").
3. Realignment layout: it contains the revised-response marker ("Here is the revised
   response:"). As a realigned model revises (the paper's HH-A mechanism), the text after the
   first marker is the answer, classified by these same rules: an answer (or a realigned
   answer) there makes the reply "realigned"; nothing there makes it "feedback" (the model
   restated feedback and never reached an answer); a critique, feedback list or echo there
   gives that class.
4. "critique": it starts with the critique prefix ("Critique:") that every self-critic target
   starts with (dataset 1.2.0 on; a checkpoint trained on older data critiques unmarked, and
   its critiques count as answers here), or with a cue of SANDBOX's judging replies
   (`sandbox/prompts.py`: "Rating:", "Reason:" of a peer's feedback, "Moral:", "Engagement:"
   of an observer's scores), which judge an answer rather than give one.
5. "feedback": it starts with the feedback header ("Feedback:") of the realignment layout and no
   marker follows (rule 3), e.g. a list of reasons cut off by the token limit.
   For 4 and 5 the marker's word less its last letter is enough ("Feedbac", "Critiqu"): an
   undertrained model writes the layout's first piece and loses the spelling after it
   ("Feedbacourages ..."); no answer to a question starts so.
6. "answer": anything else.

"answer" and "realigned" count as answering (`answer_share`); `answer_text` is the text to
score as the answer (the whole reply, or the part after the marker).
"""

import collections
from typing import Iterable

from data_prep import alignment_examples as ax
from stable_alignment_jax.sandbox import prompts as sandbox_prompts

CLASSES = ("answer", "realigned", "critique", "feedback", "echo", "empty")
ANSWERING = ("answer", "realigned")
# eval's tasks (eval/run.py) and their results-table columns: greedy, and sampled with
# per-item seeds (config answer_format.temperature).
TASK_COLUMNS = {"answer_format": "Answers", "answer_format_sampled": "Answers (sampled)"}


def _head(text: str) -> str:
  """A prompt sentence up to its first clause break: what an echo of it starts with."""
  cut = min((i for i in (text.find(c) for c in ":,.") if i > 0), default=len(text))
  return text[:cut]


# "### Instruction:", "### Input:", "### Response:" as the Alpaca layouts write them.
ALPACA_HEADERS = tuple(line for line in ax.ALPACA_WITH_INPUT.split("\n")
                       if line.startswith("###"))
ECHO_MARKERS = tuple(dict.fromkeys(ALPACA_HEADERS + tuple(_head(t) for t in (
    ax.ALPACA_NO_INPUT, ax.ALPACA_WITH_INPUT, ax.CRITIQUE_INSTRUCTION, ax.REVISE_INSTRUCTION))))
JUDGING_CUES = (sandbox_prompts.RATING_CUE, sandbox_prompts.REASON_CUE, sandbox_prompts.MORAL_CUE,
                sandbox_prompts.ENGAGEMENT_CUE)
# The critique/revise input block: one line per head ("Question:", "Answer:").
JUDGED_HEADS = tuple(line.split("{")[0].strip() for line in ax.JUDGED.split("\n"))


def _echoes(text: str) -> bool:
  if any(m in text for m in ECHO_MARKERS):
    return True
  lines = [line.strip() for line in text.split("\n")]
  first = next((i for i, line in enumerate(lines) if line.startswith(JUDGED_HEADS[0])), None)
  return first is not None and any(line.startswith(JUDGED_HEADS[1]) for line in lines[first + 1:])


def _stem(marker: str) -> str:
  return marker.rstrip(":")[:-1]


def _split(text: str) -> tuple[str, str | None]:
  """(class, the answer text or None)."""
  text = text.strip()
  if not text:
    return "empty", None
  if _echoes(text):
    return "echo", None
  if ax.REVISED_MARKER in text:
    tail = text.split(ax.REVISED_MARKER, 1)[1]
    kind, answer = _split(tail)
    if kind == "empty":
      return "feedback", None
    return ("realigned", answer) if kind in ANSWERING else (kind, None)
  if text.startswith((_stem(ax.CRITIQUE_PREFIX),) + JUDGING_CUES):
    return "critique", None
  if text.startswith(_stem(ax.FEEDBACK_HEADER)):
    return "feedback", None
  return "answer", text


def classify(text: str) -> str:
  """One of CLASSES (rules in the module docstring)."""
  return _split(text)[0]


def answer_text(text: str) -> str | None:
  """The text to score as the answer: the whole reply for "answer", the part after the
  revised-response marker for "realigned", None for the other classes."""
  return _split(text)[1]


def summarize(texts: Iterable[str]) -> dict:
  """{"n", "answer_share", "answer_share_se" (bootstrap), "counts": {class: n},
  "shares": {class: share}}; shares are None when there are no texts."""
  from eval.metrics import bootstrap_se
  kinds = [classify(t) for t in texts]
  n = len(kinds)
  counts = collections.Counter(kinds)
  answering = [float(k in ANSWERING) for k in kinds]
  return {"n": n,
          "answer_share": sum(answering) / n if n else None,
          "answer_share_se": bootstrap_se(answering) if n > 1 else None,
          "counts": {c: counts[c] for c in CLASSES},
          "shares": {c: counts[c] / n if n else None for c in CLASSES}}
