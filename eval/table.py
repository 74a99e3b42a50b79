"""The paper-shaped results table (systems x HH, HH-A, Moral Stories, MIC, ETHICS, TruthfulQA MC1,
then extra columns: a config's extra MC tasks, the answer-format shares "Answers" and "Answers
(sampled)") and its plots, rebuilt from saved results, never from a model.

  python -m eval.table runs/eval                       # every system under runs/eval
  python -m eval.table stage3=runs/eval/stage3 sft=runs/eval_sft/sft --out=table \\
      --reference=paper_numbers.json

Each argument is a system's results directory (`name=` renames it) or a directory holding
several. Writes <out>/results.md, <out>/results.json, <out>/bars.png (grouped bars per
benchmark with error bars) and <out>/hh_scores.png (distribution of 1-10 judge ratings per
system). Cells are mean ± std: for HH/HH-A the spread of ratings, for accuracies the bootstrap
standard error. `--reference` is a JSON file {system: {column: value or [value, std]}} shown as
extra rows marked "(reference)", e.g. the numbers a paper reports.

From Python: `eval.table.make_table(inputs, out_dir, reference=None) -> markdown str`.
"""

import json
import os

import numpy as np
from absl import app, flags

from eval import answer_format, metrics, results


def find_systems(inputs) -> dict[str, str]:
  """name -> system results directory, for 'dir' or 'name=dir' inputs (order kept)."""
  out = {}
  for arg in ([inputs] if isinstance(inputs, str) else inputs):
    name, sep, path = str(arg).partition("=")
    if not sep:
      name, path = "", str(arg)
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"results directory not found: {path}")
    if _is_system_dir(path):
      out[name or os.path.basename(os.path.normpath(path))] = path
      continue
    subs = sorted(d for d in os.listdir(path) if _is_system_dir(os.path.join(path, d)))
    if not subs:
      raise FileNotFoundError(f"{path}: no eval results in it (expected <task>.jsonl files or "
                              "system directories holding them)")
    for d in subs:
      out[f"{name}/{d}" if name else d] = os.path.join(path, d)
  return out


def _is_system_dir(path: str) -> bool:
  return os.path.isdir(path) and any(f.endswith(".jsonl") for f in os.listdir(path))


def with_rated_counts(summary: dict) -> dict:
  """The summary's columns with, on each judge-scored one, `rated` (answers the judge's reply
  gave a score for) and `of` (answers judged); a column nothing was rated in is kept (value
  None) so the gap shows instead of vanishing."""
  cols = dict(summary.get("columns", {}))
  for col, task in metrics.RATING_COLUMNS.items():
    r = (summary.get("ratings") or {}).get(task)
    if r is not None:
      base = cols.get(col) or {"value": None, "std": None, "kind": "rating"}
      cols[col] = {**base, "rated": r["rated"], "of": r["n"]}
  return cols


def rated_note(col: dict) -> str:
  """"k/n rated", and a warning when fewer than half of the answers were rated."""
  if not col or "of" not in col:
    return ""
  note = f"{col['rated']}/{col['of']} rated"
  if 2 * col["rated"] < col["of"]:
    note += ", fewer than half: judge replies unparsed"
  return note


def printed_columns(summary: dict) -> dict[str, str]:
  """eval.run's printed line: mean±std per column, and on a judge-scored column how many
  answers the judge rated (flagged when fewer than half)."""
  out = {}
  for k, v in with_rated_counts(summary).items():
    cell = "–" if v.get("value") is None else f"{v['value']:.4f}±{(v['std'] or 0):.4f}"
    note = rated_note(v)
    out[k] = f"{cell} ({note})" if note else cell
  return out


def _cell(col: dict | None, kind: str) -> str:
  note = rated_note(col)
  if not col or col.get("value") is None:
    return f"– ({note})" if note else "–"
  fmt = "{:.2f}" if kind == "rating" else "{:.3f}"
  std = col.get("std")
  cell = fmt.format(col["value"]) + ("" if std is None else " ± " + fmt.format(std))
  return f"{cell} ({note})" if note else cell


def _reference_rows(path: str | None, extra=()) -> dict:
  if not path:
    return {}
  with open(path) as f:
    data = json.load(f)
  rows = {}
  for system, cols in data.items():
    unknown = sorted(set(cols) - set(metrics.COLUMNS) - set(extra))
    if unknown:
      raise KeyError(f"{path}: system {system!r} has unknown columns {unknown}; known: "
                     f"{list(metrics.COLUMNS)}")
    rows[f"{system} (reference)"] = {
        c: {"value": v[0], "std": v[1]} if isinstance(v, (list, tuple)) else
           {"value": v, "std": None} for c, v in cols.items()}
  return rows


def make_table(inputs, out_dir: str, reference: str | None = None) -> str:
  """Writes results.md/json and the PNG plots under out_dir; returns the markdown."""
  found = find_systems(inputs)
  summaries = {name: results.rebuild_summary(path) for name, path in found.items()}
  rows = {name: with_rated_counts(s) for name, s in summaries.items()}
  extra = list(dict.fromkeys(c for cols in rows.values() for c, v in cols.items()
                             if c not in metrics.COLUMNS and v.get("extra")))
  rows.update(_reference_rows(reference, extra))
  columns = list(metrics.COLUMNS) + extra
  kinds = {c: "rating" if c in metrics.RATING_COLUMNS else "accuracy" for c in columns}
  lines = ["| System | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for name, cols in rows.items():
    lines.append(f"| {name} | " + " | ".join(_cell(cols.get(c), kinds[c])
                                              for c in columns) + " |")
  md = "\n".join(lines) + "\n\nHH/HH-A: mean judge rating 1-10 ± std of ratings (k/n rated: " \
      "answers whose judge reply gave a rating, of those judged); other columns: " \
      "accuracy ± bootstrap standard error; – = not evaluated.\n"
  shown = [c for c in answer_format.TASK_COLUMNS.values() if c in columns]
  if shown:
    md += (f"{' / '.join(shown)}: share of held-out questions the system answers (not a "
           "critique, a feedback list, an echo of the prompt or nothing; eval/answer_format.py), "
           "greedy / sampled, ± bootstrap standard error.\n")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  results.write_json(os.path.join(out_dir, "results.json"), {
      "columns": columns, "rows": rows,
      "systems": {n: {"dir": found[n], "tasks": s["tasks"], "ratings": s["ratings"],
                      "answer_format": s.get("answer_format", {})}
                  for n, s in summaries.items()}})
  plot_bars(rows, os.path.join(out_dir, "bars.png"), columns)
  plot_ratings({n: s["ratings"] for n, s in summaries.items()},
               os.path.join(out_dir, "hh_scores.png"))
  return md


def plot_bars(rows: dict, path: str, columns=metrics.COLUMNS) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(rows)
  fig, axs = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6))
  colors = plt.cm.tab10(np.arange(len(names)) % 10)
  for ax, col in zip(axs, columns):
    vals = [rows[n].get(col, {}).get("value") for n in names]
    errs = [rows[n].get(col, {}).get("std") or 0 for n in names]
    x = np.arange(len(names))
    ax.bar(x, [np.nan if v is None else v for v in vals], yerr=errs, color=colors, capsize=3)
    ax.set_title(col, fontsize=10)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 10 if col in metrics.RATING_COLUMNS else 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_ratings(ratings: dict, path: str) -> None:
  """Per system, the share of each 1-10 rating on HH and HH-A (grouped bars)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
  names = list(ratings)
  width = 0.8 / max(1, len(names))
  for ax, (col, task) in zip(axs, metrics.RATING_COLUMNS.items()):
    for k, name in enumerate(names):
      r = ratings[name].get(task)
      if not r or not r["rated"]:
        continue
      share = np.asarray(r["hist"], float) / r["rated"]
      ax.bar(np.arange(1, 11) + (k - (len(names) - 1) / 2) * width, share, width,
             label=f"{name} (n={r['rated']}, unparsed {r['unparsed']})")
    ax.set_title(f"{col}: judge ratings")
    ax.set_xticks(range(1, 11))
    ax.set_xlabel("rating")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axs[0].set_ylabel("share of answers")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("give results directories (name=dir to rename)")
  args = flags.FLAGS
  out = args.out or os.path.join(inputs[0].partition("=")[2] or inputs[0], "table")
  try:
    md = make_table(inputs, out, args.reference or None)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise SystemExit(f"eval.table: {e}")
  print(md)
  print(f"wrote {out}/results.md, results.json, bars.png, hh_scores.png")


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module defines none."""
  flags.DEFINE_string("out", "", "output dir (default: <first input>/table)")
  flags.DEFINE_string("reference", "", "JSON {system: {column: value|[value, std]}}")
  app.run(main)


if __name__ == "__main__":
  cli()
