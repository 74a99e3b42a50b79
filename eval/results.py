"""The on-disk results of one system: what makes an eval resumable and the table rebuildable.

<out_dir>/<system>/
  <task>.jsonl     per-item records, appended as each chunk finishes (kind mc | answer | rating)
  <task>.json      written once the task is complete: its summary, the limit it ran with, timing
  summary.json     every finished task's numbers and the table columns (metrics.summarize, and
                   the answer-format shares: `add_answer_format`)
Task names contain '/' (ethics/justice/test); file names use '__' instead.
A killed run leaves complete lines in the .jsonl (each append is flushed per chunk; a torn last
line is dropped on read), so a re-run scores only the items whose records are missing.
"""

import json
import os

from eval import answer_format, metrics

SUMMARY = "summary.json"


def task_file(task: str) -> str:
  return task.replace("/", "__")


def task_name(file_stem: str) -> str:
  return file_stem.replace("__", "/")


class SystemResults:

  def __init__(self, directory: str):
    self.dir = directory
    os.makedirs(directory, exist_ok=True)

  def _path(self, task: str, ext: str) -> str:
    return os.path.join(self.dir, task_file(task) + ext)

  def records(self, task: str) -> list[dict]:
    path = self._path(task, ".jsonl")
    if not os.path.exists(path):
      return []
    out = []
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
    for n, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        if n >= len(lines) - 2:  # the torn tail of a killed write: those items are redone
          continue
        raise ValueError(f"{path}:{n + 1}: corrupt results record (not JSON)") from None
    return out

  def append(self, task: str, records: list[dict]) -> None:
    if not records:
      return
    path = self._path(task, ".jsonl")
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in records))
      f.flush()
      os.fsync(f.fileno())

  def finished(self, task: str, limit: int) -> dict | None:
    path = self._path(task, ".json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      info = json.load(f)
    return info if info.get("limit") == limit else None

  def mark_finished(self, task: str, info: dict) -> None:
    write_json(self._path(task, ".json"), info)

  def tasks_on_disk(self) -> list[str]:
    return sorted(task_name(f[:-len(".jsonl")]) for f in os.listdir(self.dir)
                  if f.endswith(".jsonl"))


def _drop_torn_tail(path: str) -> None:
  """Cuts a half-written last line (a killed run) so new records start on a line of their own."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    f.seek(max(0, size - (1 << 20)))  # a record line is far shorter than 1 MiB
    tail = f.read()
    cut = tail.rfind(b"\n")
    f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))


def write_json(path: str, data) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)  # readers never see half a file


def write_summary(directory: str, summary: dict) -> None:
  write_json(os.path.join(directory, SUMMARY), summary)


def rebuild_summary(directory: str) -> dict:
  """A system's summary recomputed from its records (only tasks marked finished count)."""
  res = SystemResults(directory)
  records = []
  for task in res.tasks_on_disk():
    path = res._path(task, ".json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      keep = set(json.load(f).get("ids", []))
    latest = {(r["kind"], r["id"]): r for r in res.records(task) if not keep or r["id"] in keep}
    records += latest.values()  # a record written twice (a re-judged item) counts once, last wins
  return add_answer_format(metrics.summarize(records), records)


def add_answer_format(summary: dict, records: list[dict]) -> dict:
  """The answer-format tasks' classes (`summary["answer_format"][task]`) and answer shares as
  extra table columns, classified from the stored texts, so a table rebuilt after a change of
  the rules applies the new ones."""
  for task, column in answer_format.TASK_COLUMNS.items():
    texts = [r["answer"] for r in records if r.get("kind") == "answer" and r.get("task") == task]
    if not texts:
      continue
    s = answer_format.summarize(texts)
    summary.setdefault("answer_format", {})[task] = s
    summary["columns"][column] = {"value": s["answer_share"], "std": s["answer_share_se"],
                                  "n": s["n"], "kind": "share", "extra": True}
  return summary
