"""The experiment's numbers from the raw measurements: results.json, results.md and one PNG.

Per system, on the held-out pairs:
- preference accuracy: the share of pairs whose chosen reply has the higher length-normalised
  (per-token mean) log-likelihood; a tie counts 1/2; SE = sqrt(p (1 - p) / n) (binomial);
- implicit-reward accuracy against the start: the share of pairs with
  [log p(chosen) - log p_start(chosen)] > [log p(rejected) - log p_start(rejected)] (summed
  log-probs: DPO's log-ratio reward; beta does not change its sign). Undefined for the start;
- chosen log-likelihood: the mean per-token log-likelihood of the held-out chosen replies.
Benchmarks: mean credit (eval.metrics.choice_credit) with its binomial SE; answer format: the
answering share of eval.answer_format.

Across seeds: mean +- sample std. Paired comparisons of two methods, both over the seeds they
share (matched by data-order seed): (1) a paired t-test on the per-seed accuracies (t with n-1
degrees of freedom); (2) a sign-flip permutation test over held-out pairs: d_i = method A's
correctness on pair i minus B's, each averaged over the shared seeds; the mean of d against
20,000 random sign flips (two-sided). (2) asks whether the difference holds on this item set,
(1) whether it is larger than the seed-to-seed spread.
"""

import json
import math
import os
import shutil

import numpy as np

METHODS = ("sft", "dpo", "sa_cpo")
LABELS = {"start": "start (SmolLM2-135M-Instruct)", "sft": "SFT (chosen)", "dpo": "DPO",
          "sa_cpo": "SA-CPO"}
BENCH = (("moral_stories", "Moral Stories"), ("ethics", "ETHICS"),
         ("truthfulqa_mc1", "TruthfulQA MC1 (0-shot)"))
N_FLIPS = 20000


def read_curve(run_dir: str) -> list[dict]:
  """The training log's train rows: [{step, loss, accuracy, ...}] (a resumed run appends;
  the last row of a step wins)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get("split", "train") == "train" and "loss" in r:
          rows[r["step"]] = {k: r[k] for k in ("step", "loss", "accuracy", "nll_best", "lr")
                             if k in r}
  return [rows[s] for s in sorted(rows)]


def correct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """1 where a > b, 1/2 on ties, 0 otherwise."""
  return (a > b) + 0.5 * (a == b)


def binomial_se(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n) if n else float("nan")


def system_metrics(raw: dict, start: dict | None) -> dict:
  """One system's summary and its per-pair correctness vectors."""
  logp, n = np.asarray(raw["pairs"]["logp"], float), np.asarray(raw["pairs"]["n"], float)
  norm = logp / np.maximum(n, 1)
  pref = correct(norm[:, 0], norm[:, 1])
  out = {"n_pairs": len(pref), "pref_acc": float(pref.mean()),
         "pref_acc_se": binomial_se(float(pref.mean()), len(pref)),
         "chosen_ll": float(norm[:, 0].mean()), "rejected_ll": float(norm[:, 1].mean())}
  vec = {"pref": pref}
  if start is not None:
    r = logp - np.asarray(start["pairs"]["logp"], float)
    imp = correct(r[:, 0], r[:, 1])
    out.update(implicit_acc=float(imp.mean()),
               implicit_acc_se=binomial_se(float(imp.mean()), len(imp)),
               reward_margin=float((r[:, 0] - r[:, 1]).mean()))
    vec["implicit"] = imp
  for task, _ in BENCH:
    if task in raw["benchmarks"]:
      cr = np.asarray(raw["benchmarks"][task]["credit"], float)
      out[task] = float(cr.mean())
      out[task + "_se"] = binomial_se(float(cr.mean()), len(cr))
      out[task + "_n"] = len(cr)
      vec[task] = cr
  out["answer_share"] = raw["answer_format"]["answer_share"]
  out["answer_n"] = raw["answer_format"]["n"]
  out["eval_seconds"] = raw.get("seconds")
  out["loadavg"] = raw.get("loadavg")
  return out, vec


def paired(vec_a: dict, vec_b: dict, key: str, seed: int = 0) -> dict:
  """A vs B on metric `key`: {seed: vector} each; see the module docstring."""
  seeds = sorted(s for s in set(vec_a) & set(vec_b) if key in vec_a[s] and key in vec_b[s])
  if not seeds:
    return {}
  per_seed = [float(vec_a[s][key].mean() - vec_b[s][key].mean()) for s in seeds]
  d = np.mean([vec_a[s][key] - vec_b[s][key] for s in seeds], axis=0)
  rng = np.random.default_rng(seed)
  flips = rng.choice([-1.0, 1.0], size=(N_FLIPS, len(d)))
  null = np.abs((flips * d).mean(axis=1))
  p_flip = float((1 + np.sum(null >= abs(d.mean()) - 1e-12)) / (N_FLIPS + 1))
  out = {"seeds": seeds, "diff": float(np.mean(per_seed)), "per_seed": per_seed,
         "sign_flip_p": p_flip, "n_items": len(d)}
  if len(seeds) > 1:
    from scipy import stats
    sd = float(np.std(per_seed, ddof=1))
    out["t"] = float(np.mean(per_seed) / (sd / math.sqrt(len(seeds)))) if sd > 0 else None
    out["t_p"] = float(stats.ttest_rel([vec_a[s][key].mean() for s in seeds],
                                       [vec_b[s][key].mean() for s in seeds]).pvalue) \
        if sd > 0 else None
  return out


def _mean_std(values: list) -> tuple[float, float | None]:
  v = [x for x in values if x is not None]
  return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def collect(done: dict) -> tuple[dict, dict]:
  """({system: metrics}, {method: {seed: vectors}}) from the ledger's finished evals."""
  evals = {k[len("eval_"):]: v["result"]["file"] for k, v in done.items()
           if k.startswith("eval_")}
  if "start" not in evals:
    return {}, {}
  with open(evals["start"]) as f:
    start = json.load(f)
  systems, vectors = {}, {}
  benches = {k[len("bench_"):]: v["result"]["file"] for k, v in done.items()
             if k.startswith("bench_")}
  for name, path in evals.items():
    with open(path) as f:
      raw = json.load(f)
    if name in benches:
      with open(benches[name]) as f:
        raw["benchmarks"].update(json.load(f)["benchmarks"])
    m, vec = system_metrics(raw, None if name == "start" else start)
    systems[name] = m
    method, _, seed = name.rpartition("_s")
    vectors.setdefault(method if name != "start" else "start", {})[
        int(seed) if name != "start" else 0] = vec
  return systems, vectors


KEYS = ("pref_acc", "implicit_acc", "chosen_ll", "moral_stories", "ethics", "truthfulqa_mc1",
        "answer_share")


def summarize(systems: dict, vectors: dict) -> dict:
  table = {}
  for method in ("start",) + METHODS:
    runs = {k: v for k, v in systems.items()
            if (k == "start" if method == "start" else k.rpartition("_s")[0] == method)}
    if not runs:
      continue
    row = {"seeds": len(runs)}
    for key in KEYS:
      have = [r for r in runs.values() if r.get(key) is not None]
      if not have:
        continue
      mean, std = _mean_std([r[key] for r in have])
      se = have[0].get(key + "_se") if len(have) == 1 else None
      row[key] = {"mean": mean, "std": std, "se": se, "n_seeds": len(have)}
    table[method] = row
  comparisons = {}
  for a, b in (("sa_cpo", "dpo"), ("sa_cpo", "sft"), ("dpo", "sft"), ("sa_cpo", "start"),
               ("dpo", "start"), ("sft", "start")):
    if a in vectors and b in vectors:
      vb = vectors[b] if b != "start" else {s: vectors["start"][0] for s in vectors[a]}
      comparisons[f"{a}-{b}"] = {key: paired(vectors[a], vb, key)
                                 for key in ("pref", "implicit") + tuple(t for t, _ in BENCH)
                                 if key in next(iter(vectors[a].values()))
                                 and key in next(iter(vb.values()))}
  return {"table": table, "comparisons": comparisons}


def _cell(cell: dict | None, pct: bool = True) -> str:
  if not cell:
    return "—"
  f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
  if cell.get("std") is not None:
    return f"{f(cell['mean'])} ± {f(cell['std'])}"
  if cell.get("se") is not None:
    return f"{f(cell['mean'])} ± {f(cell['se'])}"
  return f(cell["mean"])


def _p(x) -> str:
  return "—" if x is None else f"{x:.3f}"


def markdown(summary: dict, split_info: dict, sizes: dict, wall: dict, probe: dict | None,
             systems: dict) -> str:
  t = summary["table"]
  lines = [
      "# SmolLM2-135M-Instruct on HH-RLHF: SFT, DPO and SA-CPO at equal budget",
      "",
      "Generated by `experiments/hh_smollm2/report.py` (do not edit; the hand-written reading "
      "is `READING.md` beside this file).",
      "",
      "| system | seeds | pref. acc. % | implicit-reward acc. % | chosen log-lik./token | "
      + " | ".join(f"{label} %" for _, label in BENCH) + " | answers % |",
      "|---|---|---|---|---|" + "---|" * len(BENCH) + "---|"]
  for method, row in t.items():
    lines.append(f"| {LABELS[method]} | {row['seeds']} | {_cell(row.get('pref_acc'))} | "
                 f"{_cell(row.get('implicit_acc'))} | {_cell(row.get('chosen_ll'), False)} | "
                 + " | ".join(_cell(row.get(task)) for task, _ in BENCH)
                 + f" | {_cell(row.get('answer_share'))} |")
  lines += [
      "",
      "Several seeds: mean ± sample std over data-order seeds; one seed (start, SFT, and the "
      "benchmarks, measured on the first seed of each method only): the value ± its binomial "
      "standard error over the items. Preference accuracy: share of held-out pairs "
      "whose chosen reply has the higher per-token log-likelihood (ties 1/2). Implicit reward: "
      "DPO's log-ratio against the start (summed log-probs), chosen above rejected.",
      "", "## Paired comparisons", "",
      "Matched by data-order seed. `t p`: paired t-test over the seeds' accuracies (n-1 df); "
      f"`sign-flip p`: permutation test over held-out items of the per-item correctness "
      f"difference averaged over the shared seeds ({N_FLIPS} flips, two-sided).", "",
      "| A − B | metric | seeds | diff (points) | per seed | t p | sign-flip p |",
      "|---|---|---|---|---|---|---|"]
  for pair, metrics in summary["comparisons"].items():
    for key, r in metrics.items():
      if not r:
        continue
      lines.append(f"| {pair} | {key} | {len(r['seeds'])} | {100 * r['diff']:+.1f} | "
                   + ", ".join(f"{100 * x:+.1f}" for x in r["per_seed"])
                   + f" | {_p(r.get('t_p'))} | {_p(r['sign_flip_p'])} |")
  tc = split_info["train_counts"]
  lc = split_info.get("loader") or {"runs": 0, "missing": 0, "dropped": 0, "left_out": 0,
                                    "cut": 0}
  lines += [
      "", "## Data", "",
      "The HH-RLHF files on this machine are Anthropic's published *test* files (harmless-base, "
      "helpful-base): the only human preference data here, so they are reused as the training "
      "source and split again by a SHA-256 hash of each dialogue's first question (lower-cased, "
      "whitespace-normalised), so every dialogue opening with a question is on one side.",
      "",
      f"- pairs read: {split_info['pairs']} ({json.dumps(split_info['files'])})",
      f"- train: {split_info['train_pairs']} pairs, {split_info['train_questions']} questions; "
      f"held out: {split_info['held_out_pairs']} pairs, {split_info['held_out_questions']} "
      f"questions; questions on both sides: {split_info['shared_questions']}",
      f"- scored held-out pairs: the first {split_info['eval_pairs']} in hash order of the "
      f"{split_info['held_out_fitting']} whose prompt and both replies fit "
      f"{sizes['eval_max_len']} tokens ({json.dumps(split_info['eval_subset'])})",
      f"- answer format: the first human turn of {split_info['questions']} distinct held-out "
      f"questions, greedy, {sizes['max_new_tokens']} new tokens, prompt format "
      f"`{split_info['format']}`",
      f"- training at max_len {sizes['max_len']}: only the {split_info['train_fitting']} of "
      f"{split_info['train_pairs']} train pairs whose prompt and both whole replies fit (the "
      "loader leaves out a reply that does not fit and never cuts one, and a pair that lost a "
      "reply has no preference left); the loader's own counts over the "
      f"{lc['runs']} runs' `data_stats.json`: {lc['dropped']} examples dropped, "
      f"{lc['left_out']} replies left out, {lc['cut']} cut"
      + (f", {lc['missing']} runs without a record" if lc["missing"] else "")
      + "; what the whole train split would lose at this max_len, counted in the driver: "
      f"{json.dumps(tc)}",
      "", "## Training (identical for every method)", "",
      f"- start: SmolLM2-135M-Instruct (the GGUF of ../shared/models dequantized to f32), "
      f"rendered in its own chat template (`{split_info['format']}`)",
      f"- {sizes['steps']} steps × {sizes['batch']} pairs = {sizes['steps'] * sizes['batch']} "
      f"pairs per run (of {split_info['train_fitting']} usable), max_len {sizes['max_len']}, "
      "AdamW lr "
      f"{sizes['lr']:g} with {sizes['warmup']:.0%} warmup then cosine to 0, grad clip "
      f"{sizes['clip']}; the data order is the seed (one loader permutation per seed, shared "
      "by the three methods)",
      "- SFT: token-mean NLL of the chosen reply; DPO: β = 0.1, reference = the start; "
      "SA-CPO: the paper's loss on the pair (ratio 0.2, margin 10, ratings on a 7-point scale: "
      "chosen 1, rejected 0)"]
  if probe:
    lines += [f"- learning rate: {probe['rule']}; candidates (tail loss): "
              + ", ".join(f"{lr}: {v:.4f}" for lr, v in probe["tail_loss"].items())
              + f" -> {probe['lr']:g} (probe seed differs from the experiment's seeds)"]
  lines += ["", "## Cost", "",
            f"- wall time of the steps in the ledger: {wall['total'] / 60:.1f} min "
            f"(training {wall['train'] / 60:.1f}, evaluation {wall['eval'] / 60:.1f}, probe "
            f"{wall['probe'] / 60:.1f}, setup {wall['setup'] / 60:.1f})",
            "- load average (1, 5, 15 min) at the end of each evaluation: "
            + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v['loadavg'])}"
                        for k, v in systems.items() if v.get("loadavg"))
            + " (2 cores: a load of 2 is a busy machine, the rest is other work waiting)",
            f"- machine: {os.cpu_count()} CPU cores shared with other work"]
  return "\n".join(lines) + "\n"


def plot(path: str, curves: dict, summary: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  for ax, method in zip(axes[:3], METHODS):
    for run, cur in sorted(curves.items()):
      if run.rpartition("_s")[0] == method and cur:
        ax.plot([r["step"] for r in cur], [r["loss"] for r in cur], label=run, alpha=0.8)
    ax.set_title(f"{LABELS[method]}: training loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  ax = axes[3]
  t = summary["table"]
  names = list(t)
  x = np.arange(len(names))
  for off, key, label in ((-0.2, "pref_acc", "preference acc."),
                          (0.2, "implicit_acc", "implicit-reward acc.")):
    cells = [t[n].get(key) for n in names]
    ax.bar(x + off, [c["mean"] if c else 0 for c in cells], 0.4, label=label,
           yerr=[(c.get("std") or c.get("se") or 0) if c else 0 for c in cells], capsize=3)
  ax.axhline(0.5, color="gray", lw=0.8, ls="--")
  ax.set_xticks(x, [LABELS[n].split(" (")[0] for n in names])
  ax.set_ylim(0.3, 0.8)
  ax.set_title("held-out HH pairs")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def loader_counts(run_dirs: list[str]) -> dict:
  """What the training loader dropped, left out or cut, summed over the runs' data_stats.json
  (the loader's own record; a run without one is counted as missing)."""
  out = {"runs": 0, "missing": 0, "dropped": 0, "left_out": 0, "cut": 0}
  for d in run_dirs:
    path = os.path.join(d, "data_stats.json")
    if not os.path.exists(path):
      out["missing"] += 1
      continue
    with open(path) as f:
      st = json.load(f)
    out["runs"] += 1
    out["dropped"] += sum(st.get("dropped", {}).values())
    out["left_out"] += sum(e.get("responses_left_out", 0) for e in st.get("entries", []))
    out["cut"] += sum(e.get("responses_cut", 0) for e in st.get("entries", []))
  return out


def write(done: dict, c, out_dir: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  systems, vectors = collect(done)
  summary = summarize(systems, vectors)
  t = c.train
  probe = done.get("lr_probe", {}).get("result")
  lr = probe["lr"] if probe and c.lr <= 0 else c.lr
  sizes = {"steps": t.train.steps, "batch": t.data.batch_size, "max_len": t.data.max_len,
           "lr": lr, "warmup": t.optim.warmup_ratio, "clip": t.optim.grad_clip,
           "eval_max_len": c.eval_max_len, "max_new_tokens": c.max_new_tokens,
           "n_bench": c.n_bench, "seeds": list(c.seeds), "sft_seeds": c.sft_seeds}
  # lr_probe's seconds contain its probe_* runs' (steps inside a step): counted once.
  sec = {k: v["seconds"] for k, v in done.items() if k != "lr_probe"}
  wall = {"total": sum(sec.values()),
          "eval": sum(v for k, v in sec.items() if k.startswith(("eval_", "bench_"))),
          "probe": sum(v for k, v in sec.items() if k.startswith("probe_")),
          "setup": sum(sec.get(k, 0) for k in ("start", "split"))}
  wall["train"] = wall["total"] - wall["eval"] - wall["probe"] - wall["setup"]
  runs = [k for k in done if k.rpartition("_s")[0] in METHODS]
  curves = {k: read_curve(done[k]["result"]["dir"]) for k in runs}
  split_info = dict(done["split"]["result"], loader=loader_counts(
      [done[k]["result"]["dir"] for k in runs]))
  md = markdown(summary, split_info, sizes, wall, probe, systems)
  results = {"systems": systems, "summary": summary, "sizes": sizes, "wall_seconds": wall,
             "step_seconds": sec, "split": split_info, "curves": curves,
             "probe": {k: v for k, v in (probe or {}).items() if k != "curves"} or None,
             "missing": [f"{m}_s{s}" for i, s in enumerate(c.seeds) for m in c.methods
                         if not (m == "sft" and i >= c.sft_seeds) and f"{m}_s{s}" not in systems]}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  if summary["table"]:
    plot(os.path.join(out_dir, "hh_smollm2.png"), curves, summary)
  return {"markdown": md, "results": results}


def copy_to(src: str, docs: str) -> None:
  os.makedirs(docs, exist_ok=True)
  for name in ("results.json", "results.md", "hh_smollm2.png"):
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(docs, name))
