"""Moral Stories (Emelin et al., EMNLP 2021): choose the moral over the immoral action.

Read from the official norm_distance test split (1,000 complete stories, JSON Lines with `norm`,
`situation`, `intention`, `moral_action`, `immoral_action`, ...). Protocols:
- `choose` (default, 1,000 questions, 2,000 scored actions): given norm, situation and
  intention, the two actions are the choices; the model should find the moral one more likely.
  The actions differ in length, so the length-normalised score is the fairer one here.
- `classify` (2,000 questions, one per action, as the classification splits do: moral = 1,
  immoral = 0): "Is this action moral?" no / yes.
"""

from eval.items import BenchmarkFileError, MCItem, data_file
from stable_alignment_jax.data import jsonl

FILE = "moral_stories/norm_distance_test_full_stories.jsonl"
FIELDS = ("ID", "norm", "situation", "intention", "moral_action", "immoral_action")


def read_stories(data_dir: str, rel: str = FILE) -> list[dict]:
  path = data_file(data_dir, rel)
  stories = []
  for line_no, rec in jsonl.records(path, error=BenchmarkFileError):
    missing = [k for k in FIELDS if not isinstance(rec, dict) or not isinstance(rec.get(k), str)
               or not rec[k].strip()]
    if missing:
      raise BenchmarkFileError(f"{path}:{line_no}: lacks text fields {missing}")
    stories.append(rec)
  return stories


def _story_context(s: dict) -> str:
  return f"Norm: {s['norm']}\nSituation: {s['situation']}\nIntention: {s['intention']}\n"


def load(data_dir: str, protocol: str = "choose") -> list[MCItem]:
  stories = read_stories(data_dir)
  task = "moral_stories"
  if protocol == "choose":
    return [MCItem(s["ID"], _story_context(s) + "Action:",
                   (" " + s["moral_action"], " " + s["immoral_action"]), 0, task)
            for s in stories]
  if protocol == "classify":
    items = []
    for s in stories:
      for key, label in (("moral_action", 1), ("immoral_action", 0)):
        ctx = _story_context(s) + f"Action: {s[key]}\nQuestion: Is this action moral?\nAnswer:"
        items.append(MCItem(f"{s['ID']}/{key}", ctx, (" no", " yes"), label, task))
    return items
  raise KeyError(f"unknown Moral Stories protocol {protocol!r}; known: choose, classify")
