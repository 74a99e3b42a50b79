"""The toy experiment's report, built only from the pipeline ledger: the method table (mean ±
std over seeds), paired comparisons across seeds (exact sign-flip test), the raters vs the oracle
and the alignment data sizes per seed, and the societies' oracle alignment per round (mean and
std over seeds). Generated only: the reading of it is docs/ANALYSIS.md."""

import itertools
import json
import os
import shutil

import numpy as np

# The methods of one seed, in training order, and their table labels (experiment.py runs them).
METHODS = {"sft": "SFT", "dpo": "DPO", "stage1": "IL", "il_matched": "IL (step-matched)",
           "stage2_noreplay": "IL+SC (no replay)", "stage3_noreplay": "IL+SC+RA (no replay)",
           "stage2": "IL+SC", "stage3": "IL+SC+RA", "mixed": "mixed 5:1:1", "ppo": "PPO"}
# (title, columns): each column is (eval set, key, label). Align* = mean alignment among parsed
# answers (an unparsed answer is missing); Parsed beside it.
TABLES = (
    ("Held-out questions (the HH analogue), greedy and sampled", (
        ("gen", "alignment", "Align"), ("gen", "parsed_share", "Parsed"),
        ("gen", "misaligned_share", "Misaligned"), ("gen", "aligned_share", "Aligned"),
        ("gen", "answer_share", "Answers"), ("gen", "alignment_all", "Align (unparsed = 0)"),
        ("gen_sampled", "alignment", "Align (sampled)"),
        ("gen_sampled", "parsed_share", "Parsed (sampled)"),
        ("gen_sampled", "misaligned_share", "Misaligned (sampled)"),
        ("gen", "engagement", "Engagement"), ("gen", "cut_share", "Cut by budget"))),
    ("Adversarial questions (the HH-A analogue, the paper's layout), greedy", (
        ("gen_adv", "alignment", "Align-A"), ("gen_adv", "parsed_share", "Parsed-A"),
        ("gen_adv", "misaligned_share", "Misaligned-A"),
        ("gen_adv", "revision_share", "Reaches a revision"),
        ("gen_adv", "continue_share", "Continues the misaligned answer"),
        ("gen_adv", "answer_share", "Answers-A"), ("gen_adv", "cut_share", "Cut-A"))),
    ("Stage 3's own skill: revise prompts of held-out questions with a misaligned draft, greedy", (
        ("revise", "shape_share", "Trained shape"), ("revise", "feedback_share", "Feedback"),
        ("revise", "marker_share", "Marker"), ("revise", "revision_share", "Revision"),
        ("revise", "stop_share", "Stops"), ("revise", "revision_alignment", "Revision align"),
        ("revise", "draft_alignment", "Draft align"), ("revise", "gain", "Gain"),
        ("revise", "improved_share", "Improved"))),
    ("Likelihood ranking (MC)", (
        ("mc", "accuracy", "MC"), ("mc_adv", "accuracy", "MC-A"),
        ("mc_hard", "accuracy", "MC hard"), ("mc_hard", "confounded", "MC hard, against"))),
)
COLUMNS = tuple(c for _, cols in TABLES for c in cols)
SIGNED = ("Align", "Align (unparsed = 0)", "Align (sampled)", "Align-A", "Revision align",
          "Draft align", "Gain", "Align-A minus Align")
LABELS = {"start": "society LM (start)", **METHODS}
ORDER = tuple(LABELS)
# Paired comparisons across seeds (same society and seed for both methods of a pair): the
# paper's ordering (IL+SC+RA > IL+SC > IL > DPO), the step-matched control, the baselines.
PAIRS = (("stage3", "stage2"), ("stage2", "stage1"), ("stage1", "dpo"), ("stage3", "stage1"),
         ("stage3", "il_matched"), ("il_matched", "stage1"), ("stage3", "dpo"),
         ("stage1", "sft"), ("stage3", "sft"), ("dpo", "sft"),
         ("stage2", "stage2_noreplay"), ("stage3", "stage3_noreplay"), ("mixed", "stage1"),
         ("mixed", "stage3"), ("ppo", "stage1"), ("ppo", "dpo"))
# "Align-A minus Align" per seed and method: A's gain over B is larger on the adversarial set
# than on the plain one when A - B of it is positive (the paper's larger gain on HH-A).
# "Aligned" (parsed and aligned, of all answers) is said beside Align: where every parsed answer
# is aligned, Align ties and only the share of aligned answers can differ.
PAIRED = ("Align", "Misaligned", "Aligned", "Parsed", "Align (sampled)", "Align-A",
          "Align-A minus Align", "MC hard")
START_CHECK = {"misaligned": 0.3, "parsed": 0.8}  # the start model must have room to improve


def sign_flip_p(diffs) -> float:
  """Exact two-sided paired permutation p-value: the share of the 2^n sign flips of the
  per-seed differences whose |mean| is at least the observed |mean|."""
  d = np.asarray(diffs, float)
  if not len(d):
    return float("nan")
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
  means = np.abs((signs * d).mean(axis=1))
  return float(np.mean(means >= abs(d.mean()) - 1e-12))


def value(result: dict, label: str) -> float:
  """One number of one eval result; NaN where it is undefined (e.g. Align with nothing
  parsed) or the result predates the column."""
  if label == "Align-A minus Align":
    return value(result, "Align-A") - value(result, "Align")
  task, key = next((t, k) for t, k, l in COLUMNS if l == label)
  v = result.get(task, {}).get(key)
  return float("nan") if v is None else float(v)


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
  """Mean, sample std and count of the defined (finite) values."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v)]
  if not len(v):
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _cell(label: str, m: float, s: float, n: int, runs: int) -> str:
  if not n:
    return "n/a"
  cell = f"{m:+.3f}" if label in SIGNED else f"{m:.3f}"
  cell = f"{cell} ± {s:.3f}" if n > 1 else cell  # one run has no spread to show
  return cell if n == runs else f"{cell} ({n} seeds)"  # seeds where it is undefined said


def table(results: dict) -> tuple[str, dict]:
  rows, parts = {}, []
  for title, cols in TABLES:
    lines = [f"### {title}", "", "| Method | seeds | " + " | ".join(c[2] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for method in ORDER:
      if method not in results:
        continue
      runs = list(results[method].values())
      cells = []
      for _, _, label in cols:
        m, s, n = mean_std([value(r, label) for r in runs])
        rows.setdefault(method, {})[label] = {"mean": m, "std": s, "n": n}
        cells.append(_cell(label, m, s, n, len(runs)))
      lines.append(f"| {LABELS[method]} | {len(runs)} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts), rows


def paired(results: dict) -> tuple[str, list]:
  """A - B per seed for PAIRS x PAIRED metrics: mean, std, seeds with A > B, sign-flip p."""
  out, lines = [], ["| A vs B | metric | mean A-B | std | seeds A > B | p (sign flip) |",
                    "|---|---|---|---|---|---|"]
  for a, b in PAIRS:
    if a not in results or b not in results:
      continue
    seeds = sorted(set(results[a]) & set(results[b]))
    for label in PAIRED:
      d = [value(results[a][s], label) - value(results[b][s], label) for s in seeds]
      d = [x for x in d if np.isfinite(x)]  # a seed where either is undefined is left out
      m, sd, n = mean_std(d)
      wins, ties, p = int(sum(x > 0 for x in d)), int(sum(x == 0 for x in d)), sign_flip_p(d)
      out.append({"a": a, "b": b, "metric": label, "mean": m, "std": sd, "n": n,
                  "a_better": wins, "ties": ties, "p": p, "diffs": d})
      # ties said apart: "0/5" alone would not tell "B better" from "equal"
      tied = f" ({ties} tied)" if ties else ""
      if not n:
        lines.append(f"| {LABELS[a]} vs {LABELS[b]} | {label} | n/a | n/a | 0/0 | n/a |")
        continue
      lines.append(f"| {LABELS[a]} vs {LABELS[b]} | {label} | {m:+.3f} | {sd:.3f} | "
                   f"{wins}/{n}{tied} | {p:.3f} |")
  return "\n".join(lines), out


def plot_rounds(societies: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (setting, rounds) in enumerate(societies.items()):
    r = [x["round"] for x in rounds]
    color = f"C{i}"
    for kind, style in (("draft", "--o"), ("revised", "-o")):
      m = np.array([x[kind] for x in rounds])
      s = np.array([x[f"{kind}_std"] for x in rounds])
      ax.plot(r, m, style, color=color, label=f"{setting} {kind}")
      ax.fill_between(r, m - s, m + s, color=color, alpha=0.1)
  ax.set_xticks(sorted({x["round"] for rounds in societies.values() for x in rounds}))
  ax.set(xlabel="SANDBOX round", ylabel="oracle alignment (-1..1)",
         title="society alignment per round and initial setting (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_methods(rows: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = ["Align", "Parsed", "Misaligned", "Align-A", "Trained shape", "MC hard"]
  methods = list(rows)
  fig, ax = plt.subplots(figsize=(10, 5.5))
  width = 0.8 / max(len(methods), 1)
  colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 methods
  for i, m in enumerate(methods):
    x = np.arange(len(labels)) + i * width
    ax.bar(x, np.nan_to_num([rows[m][l]["mean"] for l in labels]), width, color=colors[i % 20],
           yerr=np.nan_to_num([rows[m][l]["std"] for l in labels]), capsize=2,
           label=LABELS[m])
  ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
  ax.axhline(0, color="k", lw=0.5)
  ax.set(ylabel="score (mean ± std over seeds)", title="scores per method")
  ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def society_rounds(done: dict, c) -> dict:
  """setting -> per round: oracle alignment of drafts / revisions, mean and std over seeds."""
  out = {}
  for setting in c.settings:
    per_seed = [done[f"sandbox_{setting}_s{s}"]["result"]["oracle_rounds"] for s in c.seeds
                if f"sandbox_{setting}_s{s}" in done]
    if not per_seed:
      continue
    rounds = []
    for r in range(min(len(x) for x in per_seed)):
      d = mean_std([x[r]["draft"] for x in per_seed])
      v = mean_std([x[r]["revised"] for x in per_seed])
      rounds.append({"round": per_seed[0][r]["round"], "draft": d[0], "draft_std": d[1],
                     "revised": v[0], "revised_std": v[1], "seeds": d[2]})
    out[setting] = rounds
  return out


def start_check(results: dict) -> str:
  """The start model must have room to improve: greedy on plain held-out questions."""
  run = next(iter(results.get("start", {}).values()), None)
  if run is None:
    return "Start-model check: not evaluated yet."
  mis, par = value(run, "Misaligned"), value(run, "Parsed")
  ok = mis >= START_CHECK["misaligned"] and par >= START_CHECK["parsed"]
  return (f"Start-model check (greedy, plain held-out questions): misaligned {mis:.3f} "
          f"(needs >= {START_CHECK['misaligned']}), parsed {par:.3f} (needs >= "
          f"{START_CHECK['parsed']}): {'met' if ok else '**NOT met**'}.")


def lengths(done: dict) -> str:
  """What max_len cost each training run, from the loaders' counts in the ledger."""
  from stable_alignment_jax.data import data_lengths
  runs, ex_lost, resp_lost, worst = 0, 0, 0, 0
  for rec in done.values():
    stats = (rec.get("result") or {}).get("data") if isinstance(rec.get("result"), dict) else None
    if not isinstance(stats, dict) or "entries" not in stats:
      continue
    runs += 1
    for entry in stats["entries"]:
      e, r = data_lengths.lost(entry)
      ex_lost, resp_lost = ex_lost + e, resp_lost + r
      worst = max(worst, entry.get("max_len_for_99", 0))
  if not runs:
    return "Lengths: no training run's loader counts in the ledger."
  return (f"Lengths (the loaders' counts over {runs} training runs, society LM included): "
          f"{ex_lost} examples and {resp_lost} responses lost to max_len; the longest entry "
          f"needs max_len {worst} for 99 % of its responses whole.")


def write(done: dict, c, out_dir: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  results = collect(done)
  md_table, rows = table(results)
  md_paired, pairs = paired(results)
  societies = society_rounds(done, c)
  if societies:
    plot_rounds(societies, os.path.join(out_dir, "sandbox_rounds.png"))
  if rows:
    plot_methods(rows, os.path.join(out_dir, "methods.png"))
  expected = ["start"] + [f"{m}_s{s}" for s in c.seeds for m in METHODS]
  missing = [e for e in expected if f"eval_{e}" not in done]
  seconds = sum(v["seconds"] for v in done.values())
  ev, w, sb = c.toy_eval, c.world, c.sandbox
  parts = ["# Toy society: results", "",
           "Generated by `python -m stable_alignment_jax.recipes.pipeline "
           "--config=experiments/toyworld/config.py` (experiments/toyworld/report.py); "
           "ANALYSIS.md beside it is the hand-written reading.", "",
           ("**PARTIAL RUN** - not evaluated yet: " + ", ".join(missing) + "\n") if missing
           else "All planned systems evaluated.\n",
           f"Compute time in the step ledger: {seconds / 60:.1f} min (the sum of the finished "
           "steps' wall times; restarts not counted).", "",
           start_check(results), "", md_table, "",
           f"Align: oracle alignment of the answers to {w.eval_items} held-out questions, -1 "
           "(all parts misaligned) .. +1, scored on the text after \"Here is the revised "
           "response:\" when the model revises, and averaged over the *parsed* answers only "
           "(every sentence a grammar part): an unparsed answer is missing, not neutral, and "
           "Parsed stands beside it (n/a: nothing parsed). Misaligned / Aligned: share of all "
           "answers that are parsed and below / above 0. Align (unparsed = 0): the old score, "
           "unknown sentences counted as 0. Greedy, and sampled at temperature "
           f"{ev['temperature']} with per-item seeds; at most {ev['max_new_tokens']} new tokens, "
           f"and never past position {ev['positions']} (the models' trained max_len). Answers: "
           "share of replies that answer (or revise into an answer) rather than critique, list "
           "feedback, echo the prompt or say nothing (eval/answer_format.py). Engagement: among "
           "parsed answers. Align-A: eval/hh.py's HH-A in the paper's layout (the question, a "
           "space and a misaligned answer in one instruction); the final answer is scored; "
           "Reaches a revision: the reply writes the marker; Continues the misaligned answer: "
           "no marker and misaligned parts written. Stage-3 skill: the realignment instruction "
           "Stage 3 trains on, for held-out questions with a misaligned draft; Trained shape: "
           "feedback restated (a society reason, no answer part) + the marker + a revision "
           "(parsed) + a stop (not cut by the budget); Revision align / Draft align / Gain: "
           "over the replies with a revision; Improved: share of all replies whose revision "
           "scores above its draft. MC: aligned vs misaligned answer by length-normalised "
           "log-likelihood; MC-A after the adversarial prompt; MC hard: two answers equal but "
           "for one part; MC hard, against: its half whose shared parts are misaligned. "
           "± = sample std over seeds. A seed reruns the society itself (every setting's "
           f"SANDBOX with that seed: {', '.join(c.settings)}; {sb.world.n_agents} agents, "
           f"{sb.rounds} rounds) and every method's training; the society LM is trained once "
           "and is every method's start. IL (step-matched): IL continued for stage 2's and "
           "stage 3's steps, each segment restarting warmup and AdamW as the stages do.", "",
           lengths(done), "",
           "## Paired comparisons across seeds", "",
           "Per seed, A and B see the same society and data. p: exact two-sided sign-flip "
           f"permutation test over the {len(c.seeds)} seeds (smallest possible p with n seeds: "
           f"2/2^n = {2 / 2 ** max(len(c.seeds), 1):.4f}; no correction for the many rows). "
           "A seed where a metric is undefined for A or B (nothing parsed) is left out of that "
           "row. Align-A minus Align: a positive A - B says A's gain over B is larger on the "
           "adversarial set than on the plain one.", "",
           md_paired, ""]
  raters = {s: done[f"rater_s{s}"]["result"] for s in c.seeds if f"rater_s{s}" in done}
  if raters:
    parts += ["## The society's raters vs the oracle, per seed", "",
              "| seed | rater | sign accuracy | corr | rated | unparsed |",
              "|---|---|---|---|---|---|"]
    for seed, r in raters.items():
      for k, v in r.items():
        parts.append(f"| {seed} | {k} | {v['accuracy']:.3f} | {v['corr']:.3f} | {v['n']} | "
                     f"{v['unparsed']:.3f} |")
    parts.append("")
  if societies:
    first = next(iter(societies.values()))
    parts += ["## Oracle alignment per SANDBOX round (mean ± std over seeds)", "",
              "| setting | " + " | ".join(f"round {x['round']} draft / revised" for x in first)
              + " |", "|---|" + "---|" * len(first)]
    for st, rounds in societies.items():
      parts.append(f"| {st} | " + " | ".join(
          f"{x['draft']:+.2f}±{x['draft_std']:.2f} / {x['revised']:+.2f}±{x['revised_std']:.2f}"
          for x in rounds) + " |")
    parts.append("")
  cards = {s: done[f"data_s{s}"]["result"].get("datasets", {}) for s in c.seeds
           if f"data_s{s}" in done}
  sizes = {s: {k: v["splits"].get("train", {}).get("examples", 0) for k, v in card.items()}
           for s, card in cards.items()}
  if sizes:
    parts += ["Alignment data per seed (train examples): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{k} {n}" for k, n in kinds.items())
        for s, kinds in sizes.items())]
  md = "\n".join(parts) + "\n"
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(_finite({"rows": rows, "per_seed": results, "paired": pairs, "rater": raters,
                       "societies": societies, "data": sizes, "missing": missing,
                       "step_seconds": {k: v["seconds"] for k, v in done.items()}}),
              f, indent=1, default=str, allow_nan=False)
  return {"markdown": md, "rows": rows, "paired": pairs, "missing": missing}


def _finite(x):
  """NaN (an undefined rater correlation, a p over no seeds) as null: results.json stays JSON."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def copy_to(src: str, dst: str) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in ("results.md", "results.json", "sandbox_rounds.png", "methods.png"):
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
