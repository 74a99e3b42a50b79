"""SANDBOX export files (DESIGN.md "Sandbox export", JSONL, one Back-Scatter episode a line).

Every line is checked against the contract; a bad line is rejected with its file, line number and
reason, and the rest of the file is still read. Scores may be `null` (the model's output could not
be parsed): such records are kept here, and each kind of example decides what it can use.
A score may carry how it was read (`<score>_source` "text" | "choice", and for a choice
`<score>_probs`, `<score>_expected`); they are checked and kept when present, and records
without them (older exports) read as before. A peer's reason may be empty (a model that chose
its rating and then wrote nothing): the self-critic builder leaves it out and counts it.
"""

import dataclasses
import json
import math
from typing import Any, Iterable

# The record's shape is the shared contract sandbox/export.py writes against.
from stable_alignment_jax.contracts import EXPORT_SCORE_RANGE as SCORE_RANGE
from stable_alignment_jax.contracts import EXPORT_SOURCES as SOURCES


@dataclasses.dataclass(frozen=True)
class Rejection:
  path: str
  line: int
  reason: str
  category: str = "bad record"  # short name the card counts by (see CATEGORIES)

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


CATEGORIES = ("malformed JSON", "not UTF-8", "missing field", "wrong type", "empty text",
              "out of range")


class BadRecord(ValueError):
  """A record that breaks the export contract; `category` is one of CATEGORIES."""

  def __init__(self, category: str, message: str):
    super().__init__(message)
    self.category = category


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _require(obj: dict, key: str, where: str):
  if key not in obj:
    raise BadRecord("missing field", f"missing field {where}{key}")
  return obj[key]


def _text(obj: dict, key: str, where: str) -> str:
  value = _require(obj, key, where)
  if not isinstance(value, str):
    raise BadRecord("wrong type",
                    f"field {where}{key}: expected a string, got {type(value).__name__}")
  if not value.strip():
    raise BadRecord("empty text", f"field {where}{key}: empty text")
  return value


def _int(obj: dict, key: str, where: str) -> int:
  value = _require(obj, key, where)
  if not _is_int(value):
    raise BadRecord("wrong type",
                    f"field {where}{key}: expected an integer, got {type(value).__name__}")
  return value


def _score(obj: dict, key: str, where: str, *, integer: bool) -> float | None:
  value = _require(obj, key, where)
  if value is None:
    return None
  ok = _is_int(value) if integer else _is_number(value)
  if not ok:
    want = "an integer" if integer else "a number"
    raise BadRecord("wrong type",
                    f"field {where}{key}: expected {want} or null, got {type(value).__name__}")
  lo, hi = SCORE_RANGE
  if not lo <= value <= hi:
    raise BadRecord("out of range", f"field {where}{key}: {value} is outside {lo}..{hi}")
  return float(value)


def _details(obj: dict, score: str, where: str) -> dict:
  """The optional fields beside a score: its source and, for a choice, distribution and mean."""
  out = {}
  name = f"{score}_source"
  if name in obj:
    if obj[name] not in SOURCES:
      raise BadRecord("wrong type", f"field {where}{name}: {obj[name]!r} is not one of {SOURCES}")
    out[name] = obj[name]
  name = f"{score}_probs"
  if name in obj:
    probs = obj[name]
    if (not isinstance(probs, list) or len(probs) != SCORE_RANGE[1] - SCORE_RANGE[0] + 1
        or not all(_is_number(p) and 0 <= p <= 1 for p in probs)
        or abs(sum(probs) - 1) > 1e-4):
      raise BadRecord("wrong type", f"field {where}{name}: expected 7 probabilities summing to 1")
    out[name] = [float(p) for p in probs]
  name = f"{score}_expected"
  if name in obj:
    value = obj[name]
    if not _is_number(value) or not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
      raise BadRecord("out of range", f"field {where}{name}: {value!r} is not a number in 1..7")
    out[name] = float(value)
  return out


def _answer(obj: dict, key: str) -> dict:
  ans = _require(obj, key, "")
  if not isinstance(ans, dict):
    raise BadRecord("wrong type", f"field {key}: expected an object, got {type(ans).__name__}")
  out = {"text": _text(ans, "text", f"{key}.")}
  for score in ("moral", "engagement"):
    out[score] = _score(ans, score, f"{key}.", integer=False)
    out.update(_details(ans, score, f"{key}."))
  return out


def _feedback(obj: dict) -> list[dict]:
  feedback = _require(obj, "feedback", "")
  if not isinstance(feedback, list):
    raise BadRecord("wrong type", f"field feedback: expected a list, got {type(feedback).__name__}")
  peers = []
  for i, fb in enumerate(feedback):
    where = f"feedback[{i}]."
    if not isinstance(fb, dict):
      raise BadRecord("wrong type",
                      f"field feedback[{i}]: expected an object, got {type(fb).__name__}")
    reason = _require(fb, "reason", where)
    if not isinstance(reason, str):
      raise BadRecord("wrong type",
                      f"field {where}reason: expected a string, got {type(reason).__name__}")
    peers.append({"peer": _int(fb, "peer", where),
                  "rating": _score(fb, "rating", where, integer=True),
                  **_details(fb, "rating", where), "reason": reason})
  return peers


def parse_record(obj) -> dict:
  """A decoded JSON value -> a checked record (same shape, scores as float|None); BadRecord.

  Fields are checked in the contract's order, so the first problem of a line is the one named.
  """
  if not isinstance(obj, dict):
    raise BadRecord("wrong type", f"expected a JSON object, got {type(obj).__name__}")
  out = {"run_id": _text(obj, "run_id", ""), "round": _int(obj, "round", ""),
         "agent": _int(obj, "agent", ""), "agent_model": _text(obj, "agent_model", ""),
         "question": _text(obj, "question", "")}
  out["draft"] = _answer(obj, "draft")
  out["feedback"] = _feedback(obj)
  out["revised"] = _answer(obj, "revised")
  return out


def json_line(path: str, n: int, raw: bytes, rejections: list) -> tuple[bool, Any]:
  """(True, value) of one raw JSONL line, or (False, None) after recording why it is none."""
  try:
    return True, json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    rejections.append(Rejection(path, n, f"not UTF-8 text: byte {e.start}", "not UTF-8"))
  except json.JSONDecodeError as e:
    rejections.append(Rejection(path, n, f"malformed JSON: {e.msg} at column {e.colno}",
                                "malformed JSON"))
  return False, None


def read_exports(paths: Iterable[str]) -> tuple[list[dict], list[Rejection], dict[str, int]]:
  """All good records of all files (file order), the rejections, and each file's line count.

  Blank lines count as lines but are neither records nor rejections.
  """
  records, rejections, lines = [], [], {}
  for path in paths:
    n = 0
    with open(path, "rb") as f:
      for n, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        ok, obj = json_line(path, n, raw, rejections)
        if not ok:
          continue
        try:
          records.append(parse_record(obj))
        except BadRecord as e:
          rejections.append(Rejection(path, n, str(e), e.category))
    lines[path] = n
  return records, rejections, lines
