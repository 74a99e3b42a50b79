"""The sandbox export (DESIGN.md "Sandbox export"): JSONL, one Back-Scatter episode a line.

  {"run_id": str, "round": int, "agent": int, "agent_model": str, "question": str,
   "draft":   {"text": str, "moral": float|null, "engagement": float|null},
   "feedback": [{"peer": int, "rating": int|null, "reason": str}],
   "revised": {"text": str, "moral": float|null, "engagement": float|null}}

Beside each score, optionally (older exports have none): `<score>_source` "text" | "choice"
(how it was read, judging.py) and, for a choice, `<score>_probs` (7 floats: the distribution
over 1..7) and `<score>_expected` (its mean), for <score> in rating / moral / engagement.
"""

import json

from stable_alignment_jax.contracts import (EXPORT_ANSWER_KEYS as ANSWER_KEYS,
                                            EXPORT_DETAIL_SUFFIXES as DETAIL_SUFFIXES,
                                            EXPORT_FEEDBACK_KEYS as FEEDBACK_KEYS,
                                            EXPORT_SCORE_RANGE as SCORE_RANGE,
                                            EXPORT_SOURCES as SOURCES, EXPORT_TOP_KEYS as TOP_KEYS)
from stable_alignment_jax.sandbox.store import Store

_LO, _HI = SCORE_RANGE
_N_SCORES = _HI - _LO + 1


def records(store: Store) -> list[dict]:
  run_id = store.get_meta("run_id")
  return [{"run_id": run_id, **{k: ep[k] for k in TOP_KEYS[1:]}} for ep in store.episodes()]


def write_jsonl(store_path: str, out_path: str) -> int:
  store = Store(store_path)
  try:
    recs = records(store)
  finally:
    store.close()
  with open(out_path, "w", encoding="utf-8") as f:
    for rec in recs:
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  return len(recs)


def _check(cond: bool, where: str, problem: str):
  if not cond:
    raise ValueError(f"{where}: {problem}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(obj: dict, required: tuple, scores: tuple, where: str) -> None:
  """The required keys in order, each score optionally followed by its detail fields."""
  allowed = [k for k in required] + [s + x for s in scores for x in DETAIL_SUFFIXES]
  extra = [k for k in obj if k not in allowed]
  _check(not extra and [k for k in obj if k in required] == list(required), where,
         f"keys {list(obj)}, expected {list(required)} (plus optional "
         f"{[s + x for s in scores for x in DETAIL_SUFFIXES]})")


def _check_details(obj: dict, score: str, where: str) -> None:
  source = obj.get(score + "_source")
  _check(source is None or source in SOURCES, f"{where}.{score}_source",
         f"{source!r} is not one of {SOURCES}")
  probs = obj.get(score + "_probs")
  if probs is not None:
    _check(source == "choice", f"{where}.{score}_probs", "given for a score not read as a choice")
    _check(isinstance(probs, list) and len(probs) == _N_SCORES and all(
        isinstance(p, float) and 0.0 <= p <= 1.0 for p in probs)
        and abs(sum(probs) - 1.0) < 1e-6, f"{where}.{score}_probs",
        "not 7 probabilities summing to 1")
  mean = obj.get(score + "_expected")
  _check(mean is None or (isinstance(mean, float) and _LO <= mean <= _HI),
         f"{where}.{score}_expected", f"{mean!r} is not a float in [1, 7]")


def validate_record(rec: dict, where: str = "record") -> None:
  """Raises naming the field when `rec` breaks the export contract."""
  _check(isinstance(rec, dict), where, "not a JSON object")
  _check(tuple(rec) == TOP_KEYS, where, f"keys {list(rec)}, expected {list(TOP_KEYS)}")
  _check(isinstance(rec["run_id"], str), f"{where}.run_id", "not a string")
  for k in ("round", "agent"):
    _check(_is_int(rec[k]) and rec[k] >= 0, f"{where}.{k}", "not a non-negative int")
  for k in ("agent_model", "question"):
    _check(isinstance(rec[k], str), f"{where}.{k}", "not a string")
  for part in ("draft", "revised"):
    ans = rec[part]
    _check(isinstance(ans, dict), f"{where}.{part}", "not an object")
    _check_keys(ans, ANSWER_KEYS, ("moral", "engagement"), f"{where}.{part}")
    _check(isinstance(ans["text"], str), f"{where}.{part}.text", "not a string")
    for k in ("moral", "engagement"):
      v = ans[k]
      _check(v is None or (isinstance(v, float) and _LO <= v <= _HI), f"{where}.{part}.{k}",
             f"{v!r} is neither null nor a float in [1, 7]")
      _check_details(ans, k, f"{where}.{part}")
  _check(isinstance(rec["feedback"], list), f"{where}.feedback", "not a list")
  for i, fb in enumerate(rec["feedback"]):
    w = f"{where}.feedback[{i}]"
    _check(isinstance(fb, dict), w, "not an object")
    _check_keys(fb, FEEDBACK_KEYS, ("rating",), w)
    _check(_is_int(fb["peer"]) and fb["peer"] != rec["agent"], f"{w}.peer",
           "not an int naming another agent")
    _check(fb["rating"] is None or (_is_int(fb["rating"]) and _LO <= fb["rating"] <= _HI),
           f"{w}.rating", f"{fb['rating']!r} is neither null nor an int in 1..7")
    _check_details(fb, "rating", w)
    _check(isinstance(fb["reason"], str), f"{w}.reason", "not a string")


def read_jsonl(path: str, *, validate: bool = True) -> list[dict]:
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      rec = json.loads(line)
      if validate:
        validate_record(rec, f"{path}:{n}")
      out.append(rec)
  return out
