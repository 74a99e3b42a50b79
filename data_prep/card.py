"""Dataset cards: what was built and what was left out, as JSON (printed and saved)."""

import collections
import json
import math
import os


def _histogram(values) -> dict[str, int]:
  counts = collections.Counter(values)
  return {str(k): counts[k] for k in sorted(counts)}


def responses_per_example(examples: list[dict]) -> dict:
  """K, the responses an example holds: its mean, range and distribution ({K: examples})."""
  ks = [len(ex["responses"]) for ex in examples]
  return {"mean": round(sum(ks) / len(ks), 3) if ks else None, "min": min(ks, default=None),
          "max": max(ks, default=None), "distribution": _histogram(ks)}


def split_card(examples: list[dict]) -> dict:
  ratings = [r for ex in examples for r in ex["ratings"]]
  return {
      "examples": len(examples),
      "responses": sum(len(ex["responses"]) for ex in examples),
      "responses_per_prompt": _histogram(len(ex["responses"]) for ex in examples),
      # Ratings binned to the nearest integer (merged duplicates can have fractional means).
      "ratings": _histogram(int(math.floor(r + 0.5)) for r in ratings),
  }


def sources_card(records: list[dict]) -> dict:
  """How the export's numbers were read: {rating, moral, engagement} -> counts of text, choice
  and null (a record without a source field was read as text: exports before choice mode)."""
  out = {k: {"text": 0, "choice": 0, "null": 0} for k in ("rating", "moral", "engagement")}

  def count(obj: dict, score: str):
    key = "null" if obj[score] is None else obj.get(f"{score}_source", "text")
    out[score][key] += 1

  for rec in records:
    for fb in rec["feedback"]:
      count(fb, "rating")
    for part in ("draft", "revised"):
      for score in ("moral", "engagement"):
        count(rec[part], score)
  return out


def rejections_card(rejections, *, keep: int = 20) -> dict:
  by_reason = collections.Counter(r.category for r in rejections)
  return {"count": len(rejections), "by_reason": dict(by_reason.most_common()),
          "first": [str(r) for r in rejections[:keep]]}


def write_card(card: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(card, f, indent=2, ensure_ascii=False)
    f.write("\n")
