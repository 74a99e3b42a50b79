"""The toy experiment's report, built only from the pipeline ledger: the method table (mean ±
std over seeds), the society's oracle alignment per round and setting, the rater's accuracy."""

import json
import os
import shutil

import numpy as np

COLUMNS = (("gen", "alignment", "Align (held-out)"), ("gen_adv", "alignment", "Align (adversarial)"),
           ("mc", "accuracy", "MC"), ("mc_adv", "accuracy", "MC-A"),
           ("mc", "confounded", "MC confounded"), ("gen", "engagement", "Engagement"),
           ("gen", "parsed_share", "Parsed"))
ORDER = ("start", "sft", "stage1", "stage2", "stage3", "dpo", "rrhf", "stage2_replay",
         "stage3_replay", "stage3_replay_long", "stage1_oracle", "stage2_oracle", "stage3_oracle")
LABELS = {"start": "society LM (start)", "sft": "SFT", "stage1": "IL", "stage2": "IL+SC",
          "stage3": "IL+SC+RA", "dpo": "DPO", "rrhf": "RRHF",
          "stage2_replay": "ablation: IL+SC, imitation replayed",
          "stage3_replay": "ablation: IL+SC+RA, imitation replayed",
          "stage3_replay_long": "ablation: IL+SC+RA, replayed, RA 4x steps",
          "stage1_oracle": "ablation: IL, oracle ratings",
          "stage2_oracle": "ablation: IL+SC, oracle ratings",
          "stage3_oracle": "ablation: IL+SC+RA, oracle ratings"}


def collect(done: dict) -> dict:
  """method -> {seed: eval result} from the ledger's eval_* steps."""
  out = {}
  for step, rec in done.items():
    if not step.startswith("eval_"):
      continue
    name = step[len("eval_"):]
    method, _, seed = name.rpartition("_s")
    if not method:
      method, seed = name, "0"
    out.setdefault(method, {})[int(seed)] = rec["result"]
  return out


def mean_std(values) -> tuple[float, float, int]:
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def table(results: dict) -> tuple[str, dict]:
  rows = {}
  head = "| Method | seeds | " + " | ".join(c[2] for c in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
  for method in ORDER:
    if method not in results:
      continue
    runs = list(results[method].values())
    cells, row = [], {}
    for task, key, label in COLUMNS:
      m, s, n = mean_std([r[task][key] for r in runs])
      row[label] = {"mean": m, "std": s, "n": n}
      cells.append(f"{m:+.3f} ± {s:.3f}" if task.startswith("gen") and key == "alignment"
                   else f"{m:.3f} ± {s:.3f}")
    rows[method] = row
    lines.append(f"| {LABELS[method]} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines), rows


def plot_rounds(societies: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (setting, rounds) in enumerate(societies.items()):
    r = [x["round"] for x in rounds]
    color = f"C{i}"
    ax.plot(r, [x["draft"] for x in rounds], "--o", color=color, label=f"{setting} draft")
    ax.plot(r, [x["revised"] for x in rounds], "-o", color=color, label=f"{setting} revised")
  ax.set(xlabel="SANDBOX round", ylabel="oracle alignment (-1..1)",
         title="society alignment per round and initial setting")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_methods(rows: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [c[2] for c in COLUMNS[:4]]
  methods = list(rows)
  fig, ax = plt.subplots(figsize=(10, 5.5))
  width = 0.8 / max(len(methods), 1)
  colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 methods
  for i, m in enumerate(methods):
    x = np.arange(len(labels)) + i * width
    ax.bar(x, [rows[m][l]["mean"] for l in labels], width, color=colors[i % 20],
           yerr=[rows[m][l]["std"] for l in labels], capsize=2, label=LABELS[m])
  ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
  ax.axhline(0, color="k", lw=0.5)
  ax.set(ylabel="score (mean ± std over seeds)", title="scores per method")
  ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(done: dict, c, out_dir: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  results = collect(done)
  md_table, rows = table(results)
  societies = {s: done[f"sandbox_{s}"]["result"]["oracle_rounds"] for s in c.settings
               if f"sandbox_{s}" in done}
  if societies:
    plot_rounds(societies, os.path.join(out_dir, "sandbox_rounds.png"))
  if rows:
    plot_methods(rows, os.path.join(out_dir, "methods.png"))
  expected = ["start"] + [f"{m}_s{s}" for s in c.seeds
                          for m in ("stage1", "stage2", "stage3", "sft", "dpo", "rrhf")]
  ablations = c.get("ablations", [])
  expected += [f"stage{k}_replay_s{s}" for s in c.seeds for k in (2, 3) if "replay" in ablations]
  expected += [f"stage{k}_oracle_s{s}" for s in c.seeds for k in (1, 2, 3)
               if "oracle_ratings" in ablations]
  expected += [f"stage3_replay_long_s{s}" for s in c.seeds if "replay_long" in ablations]
  missing = [e for e in expected if f"eval_{e}" not in done]
  seconds = sum(v["seconds"] for v in done.values())
  rater = done.get("rater", {}).get("result")
  parts = ["# Toy society: results", "",
           ("**PARTIAL RUN** - not evaluated yet: " + ", ".join(missing) + "\n") if missing
           else "All planned systems evaluated.\n",
           f"Compute time in the step ledger: {seconds / 60:.1f} min (the sum of the finished "
           "steps' wall times, i.e. one uninterrupted run; restarts not counted).",
           "", md_table, "",
           "Align: oracle alignment of greedy answers to held-out questions, -1 (all parts "
           "misaligned) .. +1; adversarial: a misaligned answer attached to the prompt. MC: aligned "
           "vs misaligned answer by length-normalised log-likelihood; MC-A after the adversarial "
           "prompt; MC confounded: the half of the items whose misaligned choice is the engaging "
           "one. Parsed: share of answers made only of grammar parts. 96 held-out questions, "
           "greedy decoding, 128 new tokens. ± = sample std over seeds (a seed changes the "
           "training data order; every method starts from the same society LM, and the society "
           "and its data are shared by all seeds).", ""]
  if rater:
    parts += ["## The society's raters vs the oracle", "",
              "| rater | sign accuracy | corr | rated | unparsed |", "|---|---|---|---|---|"]
    for k, v in rater.items():
      parts.append(f"| {k} | {v['accuracy']:.3f} | {v['corr']:.3f} | {v['n']} | "
                   f"{v['unparsed']:.3f} |")
    parts.append("")
  if societies:
    parts += ["## Oracle alignment per SANDBOX round", "",
              "| setting | " + " | ".join(f"round {x['round']} draft / revised"
                                          for x in next(iter(societies.values()))) + " |",
              "|---|" + "---|" * len(next(iter(societies.values())))]
    for s, rounds in societies.items():
      parts.append(f"| {s} | " + " | ".join(f"{x['draft']:+.2f} / {x['revised']:+.2f}"
                                            for x in rounds) + " |")
    parts.append("")
  card = done.get("data", {}).get("result", {}).get("datasets", {})
  if card:
    parts.append("Alignment data (train examples): " + ", ".join(
        f"{k} {v['splits'].get('train', {}).get('examples', 0)}" for k, v in card.items()))
  md = "\n".join(parts) + "\n"
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"rows": rows, "per_seed": results, "rater": rater, "societies": societies,
               "missing": missing, "step_seconds": {k: v["seconds"] for k, v in done.items()}},
              f, indent=1, default=str)
  return {"markdown": md, "rows": rows, "missing": missing}


def copy_to(src: str, dst: str) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in ("results.md", "results.json", "sandbox_rounds.png", "methods.png"):
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
