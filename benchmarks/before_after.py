"""One benchmark script run from two revisions of the tree, side by side, so a refactor's speed
is judged against the code it replaced under the same load.

  python benchmarks/before_after.py --before=335ccef [--after=WORKTREE] [--rounds=2] \
      -- train_step.py --steps 3

Each revision runs its own copy of `benchmarks/<script>` with its own package on PYTHONPATH (the
before side is a detached `git worktree` in a temporary directory, removed at the end; the after
side is this checkout unless --after names another). Rounds alternate the order (before, after,
after, before, ...) so a change in the machine's load hits both sides alike. Every numeric figure
the script writes with `--json` is flattened to a dotted key (a list of repeated timings to its
best); the table gives each key's best
round on both sides (the minimum for times, the maximum for rates, read from the key's name) and
their ratio after/before, with the load average around every run. The figures are only worth
quoting when the runs say they were quiet (benchmarks/common.py flags a contaminated run).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RATE_WORDS = ("per_s", "tokens_s", "flops", "mfu", "speedup", "ratio_vs", "throughput")


def flatten(d, prefix="") -> dict[str, float]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
  elif isinstance(d, (list, tuple)):
    if d and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d):
      # a figure's repeated timings: its best (min for times, max for rates), as the table
      # takes the best round
      pick = max if higher_is_better(prefix) else min
      out[prefix[:-1]] = float(pick(d))
    else:
      for i, v in enumerate(d):
        out.update(flatten(v, f"{prefix}{i}."))
  elif isinstance(d, (int, float)) and not isinstance(d, bool):
    out[prefix[:-1]] = float(d)
  return out


def higher_is_better(key: str) -> bool:
  k = key.lower()
  return any(w in k for w in RATE_WORDS)


def settle(limit: float, timeout_s: float = 600.0) -> None:
  """Waits until the 1-minute load average is below `limit` (the previous side's own threads
  keep it up for a minute or two), so each side starts on a quiet machine; gives up after
  `timeout_s` and says so."""
  t0 = time.time()
  while os.getloadavg()[0] >= limit and time.time() - t0 < timeout_s:
    time.sleep(5)
  if os.getloadavg()[0] >= limit:
    print(f"[before_after] load still {os.getloadavg()[0]:.2f} after {timeout_s:.0f} s",
          flush=True)


def run_side(tree: str, script: str, args: list[str], out_json: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree)
  cmd = [sys.executable, os.path.join(tree, "benchmarks", script), *args, "--json", out_json]
  print(f"[before_after] {tree}: {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.2f})",
        flush=True)
  subprocess.run(cmd, cwd=tree, env=env, check=True)
  with open(out_json) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--before", required=True, help="a git revision of this repository")
  ap.add_argument("--after", default=ROOT, help="a checkout (default: this one)")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--settle", type=float, default=0.5,
                  help="wait for the load average to fall below this before each side (0: no)")
  ap.add_argument("script", help="benchmarks/<script>")
  ap.add_argument("args", nargs=argparse.REMAINDER)
  a = ap.parse_args()
  args = [x for x in a.args if x != "--"]
  with tempfile.TemporaryDirectory() as tmp:
    before = os.path.join(tmp, "before")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", before, a.before],
                   check=True)
    try:
      runs = {"before": [], "after": []}
      trees = {"before": before, "after": os.path.abspath(a.after)}
      for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for side in order:
          if a.settle:
            settle(a.settle)
          data = run_side(trees[side], a.script, args, os.path.join(tmp, f"{side}{r}.json"))
          runs[side].append(flatten(data))
    finally:
      subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before], check=False)
  keys = [k for k in runs["before"][0] if all(k in x for x in runs["before"] + runs["after"])]
  print(f"\n{a.script} {' '.join(args)}: before = {a.before}, after = {a.after}, "
        f"{a.rounds} round(s) each, best round per side\n")
  print("| figure | before | after | after / before |\n|---|---|---|---|")
  for k in keys:
    pick = max if higher_is_better(k) else min
    b, f = pick(x[k] for x in runs["before"]), pick(x[k] for x in runs["after"])
    ratio = f"{f / b:.3f}" if b else "-"
    print(f"| {k} | {b:.4g} | {f:.4g} | {ratio} |")


if __name__ == "__main__":
  main()
