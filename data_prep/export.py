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
from typing import Any, Iterable

# The record's shape and its check are the shared contract sandbox/export.py writes against.
from stable_alignment_jax.contracts import EXPORT_PROBLEM_CATEGORIES as CATEGORIES  # noqa: F401
from stable_alignment_jax.contracts import EXPORT_SCORES, export_problems


@dataclasses.dataclass(frozen=True)
class Rejection:
  path: str
  line: int
  reason: str
  category: str = "bad record"  # short name the card counts by (see CATEGORIES)

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


class BadRecord(ValueError):
  """A record that breaks the export contract; `category` is one of CATEGORIES."""

  def __init__(self, category: str, message: str):
    super().__init__(message)
    self.category = category


def _as_float(x):
  return None if x is None else float(x)


def _scores(obj: dict, part: str) -> dict:
  """The scores of a checked answer or peer as floats, each with the details it carries."""
  out = {}
  for score in EXPORT_SCORES[part]:
    out[score] = _as_float(obj[score])
    if f"{score}_source" in obj:
      out[f"{score}_source"] = obj[f"{score}_source"]
    if f"{score}_probs" in obj:
      out[f"{score}_probs"] = [float(p) for p in obj[f"{score}_probs"]]
    if f"{score}_expected" in obj:
      out[f"{score}_expected"] = float(obj[f"{score}_expected"])
  return out


def parse_record(obj) -> dict:
  """A decoded JSON value -> a checked record (same shape, scores as float|None); BadRecord
  naming the first problem (contracts.export_problems, in the contract's field order), or an
  empty draft or revision."""
  problems = export_problems(obj)
  if problems:
    raise BadRecord(problems[0].category, str(problems[0]))
  # The one thing read here beyond the contract: an empty answer (the model wrote nothing) is a
  # well-formed record the sandbox may write, but no example can use it.
  for part in ("draft", "revised"):
    if not obj[part]["text"].strip():
      raise BadRecord("empty text", f"field {part}.text: empty text")
  out = {k: obj[k] for k in ("run_id", "round", "agent", "agent_model", "question")}
  out["draft"] = {"text": obj["draft"]["text"], **_scores(obj["draft"], "draft")}
  out["feedback"] = [{"peer": fb["peer"], **_scores(fb, "feedback"), "reason": fb["reason"]}
                     for fb in obj["feedback"]]
  out["revised"] = {"text": obj["revised"]["text"], **_scores(obj["revised"], "revised")}
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
