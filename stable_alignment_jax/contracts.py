"""Facts several layers must agree on, each written once. Imports nothing of ours, so every
layer (model, data, sampling, serving, training, sandbox, data_prep, eval) may import it."""

import dataclasses
import math


def bucket(n: int, minimum: int = 1) -> int:
  """The length (or batch) `n` is padded to: the next power of two, at least `minimum`, so every
  size of a bucket shares one compiled program (the sampler, the server's batcher, PPO's room
  check)."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


# --- the three kinds of alignment data (data_prep builds them; the stages train them) ------------

KINDS = ("imitation", "self_critic", "realignment")
STAGE_KINDS = {"stage1": "imitation", "stage2": "self_critic", "stage3": "realignment"}

# --- prompt texts and markers (training data, the sampler's chat template, evaluation) ----------

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Alpaca's two prompt layouts (without / with an input block).
ALPACA_NO_INPUT = (ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
REVISED_MARKER = "Here is the revised response:"  # before the revision in a realignment reply
FEEDBACK_HEADER = "Feedback:"  # the first line of a (bulleted) realignment response
CRITIQUE_PREFIX = "Critique:"  # the start of every self-critic response


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca prompt of an instruction (and its input block when there is one)."""
  if input_text:
    return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
  return ALPACA_NO_INPUT.format(instruction=instruction)


# --- the SANDBOX export (DESIGN.md "Sandbox export"): one Back-Scatter episode a JSONL line ------
# sandbox/export.py writes it, data_prep/export.py reads it; both check a record with
# export_problems below, so they accept and reject the same records with the same words
# (data_prep never imports sandbox).

EXPORT_TOP_KEYS = ("run_id", "round", "agent", "agent_model", "question", "draft", "feedback",
                   "revised")
EXPORT_ANSWER_KEYS = ("text", "moral", "engagement")  # draft and revised
EXPORT_FEEDBACK_KEYS = ("peer", "rating", "reason")
EXPORT_SCORE_RANGE = (1, 7)  # observer scores and peer ratings: the paper's 1-7 scale
# Beside a score, optionally: how it was read, and for a choice its distribution and mean.
EXPORT_SOURCES = ("text", "choice")
EXPORT_DETAIL_SUFFIXES = ("_source", "_probs", "_expected")
EXPORT_SCORES = {"draft": ("moral", "engagement"), "revised": ("moral", "engagement"),
                 "feedback": ("rating",)}
# What the data card counts rejected lines by: the first five are export_problems' categories,
# the last two are the reader's, for a line that is no JSON value at all.
EXPORT_PROBLEM_CATEGORIES = ("missing field", "unknown field", "wrong type", "empty text",
                             "out of range", "malformed JSON", "not UTF-8")


@dataclasses.dataclass(frozen=True)
class ExportProblem:
  """One way a record breaks the export contract: the field (a path such as
  `feedback[0].rating`; "" for the record itself), a category of EXPORT_PROBLEM_CATEGORIES, and
  what is wrong."""
  field: str
  category: str
  problem: str

  def __str__(self) -> str:
    return f"field {self.field}: {self.problem}" if self.field else self.problem


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _type_name(x) -> str:
  return "null" if x is None else type(x).__name__


class _Walk:
  """Collects the problems of one record, field by field in the contract's order."""

  def __init__(self):
    self.problems: list[ExportProblem] = []

  def bad(self, field: str, category: str, problem: str) -> None:
    self.problems.append(ExportProblem(field, category, problem))

  def get(self, obj: dict, key: str, where: str):
    """(present, value) of `obj[key]`; a missing key is a problem."""
    if key not in obj:
      self.bad(where + key, "missing field", "missing")
      return False, None
    return True, obj[key]

  def object(self, value, field: str) -> bool:
    if isinstance(value, dict):
      return True
    self.bad(field, "wrong type", f"expected an object, got {_type_name(value)}")
    return False

  def text(self, obj: dict, key: str, where: str, *, may_be_empty: bool = False) -> None:
    ok, value = self.get(obj, key, where)
    if not ok:
      return
    if not isinstance(value, str):
      self.bad(where + key, "wrong type", f"expected a string, got {_type_name(value)}")
    elif not may_be_empty and not value.strip():
      self.bad(where + key, "empty text", "empty text")

  def count(self, obj: dict, key: str, where: str) -> None:
    ok, value = self.get(obj, key, where)
    if not ok:
      return
    if not _is_int(value):
      self.bad(where + key, "wrong type", f"expected an integer, got {_type_name(value)}")
    elif value < 0:
      self.bad(where + key, "out of range", f"{value} is negative")

  def score(self, obj: dict, key: str, where: str, *, integer: bool) -> None:
    """A score on the 1-7 scale or null, then its optional details (how it was read)."""
    lo, hi = EXPORT_SCORE_RANGE
    ok, value = self.get(obj, key, where)
    if ok and value is not None:
      if not (_is_int(value) if integer else _is_number(value)):
        want = "an integer" if integer else "a number"
        self.bad(where + key, "wrong type", f"expected {want} or null, got {_type_name(value)}")
      elif not lo <= value <= hi:
        self.bad(where + key, "out of range", f"{value} is outside {lo}..{hi}")
    source = obj.get(key + "_source")
    if key + "_source" in obj and source not in EXPORT_SOURCES:
      self.bad(f"{where}{key}_source", "wrong type",
               f"{source!r} is not one of {list(EXPORT_SOURCES)}")
    if key + "_probs" in obj:
      probs = obj[key + "_probs"]
      if (not isinstance(probs, list) or len(probs) != hi - lo + 1
          or not all(_is_number(p) and 0 <= p <= 1 for p in probs)
          or abs(sum(probs) - 1) > 1e-4):
        self.bad(f"{where}{key}_probs", "wrong type",
                 f"expected {hi - lo + 1} probabilities summing to 1")
      elif source != "choice":
        self.bad(f"{where}{key}_probs", "wrong type",
                 f"given for a score read as {source!r}, not as a choice")
    if key + "_expected" in obj:
      mean = obj[key + "_expected"]
      if not _is_number(mean) or not lo <= mean <= hi:
        self.bad(f"{where}{key}_expected", "out of range", f"{mean!r} is not a number in {lo}..{hi}")

  def no_others(self, obj: dict, keys: tuple, scores: tuple, where: str) -> None:
    allowed = set(keys) | {s + x for s in scores for x in EXPORT_DETAIL_SUFFIXES}
    for k in obj:
      if k not in allowed:
        self.bad(where + str(k), "unknown field", "not in the export contract")


def export_problems(rec) -> list[ExportProblem]:
  """Every way a decoded JSON value breaks the SANDBOX export contract, in the contract's field
  order (so the first is the one a reader names); [] for a good record. Checked: every key
  present and no other; run_id, agent_model and question non-empty strings, the answers'
  texts strings; round, agent and peer non-negative integers, a peer never the agent itself; feedback a list
  (a peer's reason may be empty: a model that rated and wrote nothing); moral and engagement
  numbers, ratings integers, each in 1..7 or null; a score's optional `_source`, and for a
  choice its 7 `_probs` summing to 1 and their mean `_expected` in 1..7."""
  w = _Walk()
  if not w.object(rec, ""):
    w.problems[-1] = ExportProblem("", "wrong type", f"expected a JSON object, got "
                                   f"{_type_name(rec)}")
    return w.problems
  w.text(rec, "run_id", "")
  w.count(rec, "round", "")
  w.count(rec, "agent", "")
  w.text(rec, "agent_model", "")
  w.text(rec, "question", "")
  for part in ("draft", "feedback", "revised"):
    ok, value = w.get(rec, part, "")
    if not ok:
      continue
    if part != "feedback":
      if w.object(value, part):
        # An answer may be empty: the sandbox writes what the model wrote (data_prep then sets
        # such a record aside, as it does with a null score it cannot use).
        w.text(value, "text", part + ".", may_be_empty=True)
        for score in EXPORT_SCORES[part]:
          w.score(value, score, part + ".", integer=False)
        w.no_others(value, EXPORT_ANSWER_KEYS, EXPORT_SCORES[part], part + ".")
      continue
    if not isinstance(value, list):
      w.bad("feedback", "wrong type", f"expected a list, got {_type_name(value)}")
      continue
    for i, fb in enumerate(value):
      where = f"feedback[{i}]."
      if not w.object(fb, where[:-1]):
        continue
      w.count(fb, "peer", where)
      if _is_int(fb.get("peer")) and fb.get("peer") == rec.get("agent"):
        w.bad(where + "peer", "out of range", "names the agent itself, not a peer")
      w.score(fb, "rating", where, integer=True)
      w.text(fb, "reason", where, may_be_empty=True)
      w.no_others(fb, EXPORT_FEEDBACK_KEYS, EXPORT_SCORES["feedback"], where)
  w.no_others(rec, EXPORT_TOP_KEYS, (), "")
  return w.problems
