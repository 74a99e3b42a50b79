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

from stable_alignment_jax.contracts import EXPORT_TOP_KEYS as TOP_KEYS
from stable_alignment_jax.contracts import export_problems
from stable_alignment_jax.sandbox.store import Store


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


def validate_record(rec, where: str = "record") -> None:
  """Raises naming `where` and the field when `rec` breaks the export contract (contracts.py's
  export_problems, the check data_prep's reader makes too)."""
  problems = export_problems(rec)
  if problems:
    raise ValueError(f"{where}: {problems[0]}")


def read_jsonl(path: str, *, validate: bool = True) -> list[dict]:
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      rec = json.loads(line)
      if validate:
        validate_record(rec, f"{path}:{n}")
      out.append(rec)
  return out
