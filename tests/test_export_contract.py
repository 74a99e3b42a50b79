"""The SANDBOX export contract is checked once (contracts.export_problems): the sandbox's writer
side (sandbox/export.validate_record, read_jsonl) and data_prep's reader (export.read_exports)
accept and reject the same records and name the same field in the same words."""

import copy
import json

import pytest

from data_prep import export as reader
from stable_alignment_jax import contracts
from stable_alignment_jax.sandbox import export as writer


def _good() -> dict:
  return {"run_id": "r", "round": 0, "agent": 0, "agent_model": "m", "question": "Is lying ok?",
          "draft": {"text": "Sometimes.", "moral": 3.0, "engagement": None},
          "feedback": [{"peer": 1, "rating": 6, "rating_source": "choice",
                        "rating_probs": [0.0, 0.0, 0.0, 0.0, 0.1, 0.6, 0.3],
                        "rating_expected": 6.2, "reason": "honest is better"},
                       {"peer": 2, "rating": None, "reason": ""}],
          "revised": {"text": "No, be honest.", "moral": 6, "moral_source": "text",
                      "engagement": 5.5}}


def _edit(path: str, value=KeyError) -> dict:
  """_good() with the field at `path` ("a.b", "feedback[0].c") set to `value` (or removed)."""
  rec = _good()
  obj, keys = rec, path.replace("[", ".").replace("]", "").split(".")
  for k in keys[:-1]:
    obj = obj[int(k)] if isinstance(obj, list) else obj[k]
  last = int(keys[-1]) if isinstance(obj, list) else keys[-1]
  if value is KeyError:
    del obj[last]
  else:
    obj[last] = value
  return rec


# (record, the field the first problem names, its category), each written by hand.
BAD = [
    (_edit("question"), "question", "missing field"),
    (_edit("draft.engagement"), "draft.engagement", "missing field"),
    (_edit("feedback[1].reason"), "feedback[1].reason", "missing field"),
    (_edit("draft.extra", 1), "draft.extra", "unknown field"),
    (_edit("note", "x"), "note", "unknown field"),
    (_edit("feedback[0].reason_source", "text"), "feedback[0].reason_source", "unknown field"),
    (_edit("run_id", 3), "run_id", "wrong type"),
    (_edit("round", "1"), "round", "wrong type"),
    (_edit("agent", True), "agent", "wrong type"),
    (_edit("draft", "text"), "draft", "wrong type"),
    (_edit("feedback", {}), "feedback", "wrong type"),
    (_edit("feedback[0]", [1]), "feedback[0]", "wrong type"),
    (_edit("feedback[0].rating", 5.5), "feedback[0].rating", "wrong type"),
    (_edit("revised.moral", "6"), "revised.moral", "wrong type"),
    (_edit("revised.moral", float("nan")), "revised.moral", "wrong type"),
    (_edit("revised.moral_source", "guess"), "revised.moral_source", "wrong type"),
    (_edit("feedback[0].rating_probs", [0.5] * 7), "feedback[0].rating_probs", "wrong type"),
    (_edit("feedback[0].rating_probs", [1 / 6] * 6), "feedback[0].rating_probs", "wrong type"),
    (_edit("revised.moral_probs", [0, 0, 0, 0, 0, 1.0, 0]), "revised.moral_probs", "wrong type"),
    (_edit("feedback[1].reason", None), "feedback[1].reason", "wrong type"),
    (_edit("agent_model", ""), "agent_model", "empty text"),
    (_edit("round", -1), "round", "out of range"),
    (_edit("feedback[0].rating", 9), "feedback[0].rating", "out of range"),
    (_edit("draft.moral", 0.5), "draft.moral", "out of range"),
    (_edit("feedback[0].rating_expected", 7.5), "feedback[0].rating_expected", "out of range"),
    (_edit("feedback[0].peer", 0), "feedback[0].peer", "out of range"),
    (_edit("feedback[0].peer", -2), "feedback[0].peer", "out of range"),
]


def _writer_verdict(rec):
  try:
    writer.validate_record(rec, "rec")
  except ValueError as e:
    assert str(e).startswith("rec: ")
    return str(e)[len("rec: "):]
  return None


def _reader_verdict(rec):
  try:
    reader.parse_record(rec)
  except reader.BadRecord as e:
    return str(e), e.category
  return None


def test_good_records_pass_both_sides():
  for rec in (_good(), _edit("feedback", []), _edit("draft.moral_source", "text"),
              _edit("feedback[0].rating_expected")):
    assert contracts.export_problems(rec) == []
    assert _writer_verdict(rec) is None
    got = reader.parse_record(json.loads(json.dumps(rec)))
    # The reader reads every score as a float and keeps the details.
    assert got["revised"]["moral"] == float(rec["revised"]["moral"])
  got = reader.parse_record(_good())
  assert got["feedback"][0]["rating"] == 6.0 and isinstance(got["feedback"][0]["rating"], float)
  assert got["feedback"][0]["rating_probs"][5] == 0.6 and got["revised"]["moral_source"] == "text"


@pytest.mark.parametrize("rec,field,category", BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_writer_and_reader_reject_the_same_record_naming_the_field(rec, field, category):
  w, r = _writer_verdict(rec), _reader_verdict(rec)
  assert w is not None and r is not None
  assert w == r[0] and r[1] == category
  assert w.startswith(f"field {field}: ")
  assert category in contracts.EXPORT_PROBLEM_CATEGORIES


def test_files_are_judged_alike_with_file_and_line(tmp_path):
  """A whole file through both: read_jsonl stops at the first bad line naming file:line and
  field; read_exports names the same line and problem, and keeps the rest."""
  path = tmp_path / "e.jsonl"
  bad = _edit("feedback[0].rating", 9)
  path.write_text("".join(json.dumps(r) + "\n" for r in (_good(), bad, _good())))
  records, rejections, _ = reader.read_exports([str(path)])
  assert len(records) == 2 and len(rejections) == 1
  with pytest.raises(ValueError) as e:
    writer.read_jsonl(str(path))
  assert str(e.value) == str(rejections[0]) == \
      f"{path}:2: field feedback[0].rating: 9 is outside 1..7"


def test_every_problem_is_listed_in_field_order():
  rec = _good()
  rec["round"], rec["question"], rec["feedback"][1]["rating"] = -1, "", 0
  del rec["revised"]["engagement"]
  assert [(p.field, p.category) for p in contracts.export_problems(rec)] == [
      ("round", "out of range"), ("question", "empty text"),
      ("feedback[1].rating", "out of range"), ("revised.engagement", "missing field")]
  assert contracts.export_problems([1]) == [
      contracts.ExportProblem("", "wrong type", "expected a JSON object, got list")]


def test_an_empty_answer_is_well_formed_but_the_reader_sets_it_aside():
  """The sandbox writes what the model wrote, an empty draft included (a tiny random model
  does); that is no contract breach, but no alignment example can use it."""
  for part in ("draft", "revised"):
    rec = _edit(f"{part}.text", "  ")
    assert contracts.export_problems(rec) == [] and _writer_verdict(rec) is None
    assert _reader_verdict(rec) == (f"field {part}.text: empty text", "empty text")
