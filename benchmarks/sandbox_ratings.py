"""SANDBOX ratings on a real small model: how many peer ratings and observer scores are usable
when read as text (strict parse) and when read as choices (next-token scores over 1..7).

A society of SmolLM2-135M-Instruct agents (the GGUF in ../shared/models, dequantized into an HF
directory by tests/hf_models.py and cached) on the in-process JAX backend, with the model's
chat template, runs once with `rating_mode=text` and once with `rating_mode=choice` (same seed,
same questions; the checkpoint is loaded once). Printed per mode: the usable share of peer
ratings and of observer scores (non-null), how they were read, the wall time, and the load
average before, between and after (benchmarks/common.py: the run is flagged above 1.0; the
shares do not depend on load, the wall times do). Target: >= 95 % usable in choice mode.
The modes alternate over `--reps` runs (text, choice, choice, text, ...); each run is the same
society, so its shares must repeat exactly (a check that the readings are deterministic) and
the wall times are reported as min and median.

  python benchmarks/sandbox_ratings.py [--models ../shared/models] [--agents 9] [--rounds 2]
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/, benchmarks/
sys.path.insert(0, os.path.join(ROOT, "tests"))  # hf_models (the GGUF -> HF converter)

from benchmarks import common  # noqa: E402

common.one_cpu_device()  # before jax is imported

from configs import sandbox as sandbox_config  # noqa: E402
from stable_alignment_jax.sandbox import export, runner  # noqa: E402
from stable_alignment_jax.sandbox.store import Store  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
QUESTIONS = os.path.join(SHARED, "data", "sandbox_questions", "hh_questions.txt")
PRIORS = os.path.join(SHARED, "data", "hh_rlhf", "harmless-base_test.jsonl.gz")


def smollm2(models_dir: str) -> str:
  import hf_models
  hf_models.SMOLLM2_GGUF = pathlib.Path(models_dir) / hf_models.SMOLLM2_GGUF.name
  return str(hf_models.smollm2_dir())


def society(model_dir: str, store: str, a) -> object:
  c = sandbox_config.get_config(f"tiny,agents={a.agents},rounds={a.rounds}")
  c.store, c.seed = store, a.seed
  c.world.question_file, c.world.prior_file = QUESTIONS, PRIORS
  c.backends.local.model, c.backends.local.tokenizer = model_dir, ""
  c.backends.local.max_prompt_tokens, c.backends.local.min_batch = 1024, 1
  c.backends.local.chat_template = a.chat_template
  for role in ("draft", "revise"):
    c.sampling[role].max_tokens = a.max_tokens
  c.sampling.feedback.max_tokens = a.feedback_tokens
  c.sampling.observe.max_tokens = 16
  return c


def usable(recs: list[dict]) -> dict:
  ratings = [f for r in recs for f in r["feedback"]]
  scores = [(r[p], k) for r in recs for p in ("draft", "revised") for k in ("moral", "engagement")]

  def by_source(items):
    out = {}
    for obj, k in items:
      key = "null" if obj[k] is None else obj.get(f"{k}_source", "text")
      out[key] = out.get(key, 0) + 1
    return out

  def histogram(values):
    out = {}
    for v in values:
      if v is not None:
        out[int(v)] = out.get(int(v), 0) + 1
    return dict(sorted(out.items()))

  return {"ratings": len(ratings),
          "ratings_usable": sum(f["rating"] is not None for f in ratings) / max(len(ratings), 1),
          "ratings_by_source": by_source((f, "rating") for f in ratings),
          "observer": len(scores),
          "observer_usable": sum(o[k] is not None for o, k in scores) / max(len(scores), 1),
          "observer_by_source": by_source(scores),
          # Which values were given: a reader that always says the same number is no rater.
          "rating_values": histogram(f["rating"] for f in ratings),
          "moral_values": histogram(o[k] for o, k in scores if k == "moral")}


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default=os.path.join(SHARED, "models"),
                  help="directory holding SmolLM2-135M-Instruct.Q4_1.gguf")
  ap.add_argument("--agents", type=int, default=9)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max_tokens", type=int, default=48, help="draft and revision length")
  ap.add_argument("--feedback_tokens", type=int, default=40, help="peer reply length")
  ap.add_argument("--chat_template", default="auto", help="auto | none | model | a name")
  ap.add_argument("--modes", default="text,choice")
  ap.add_argument("--reps", type=int, default=1, help="alternated runs of every mode")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  for path in (QUESTIONS, PRIORS):
    if not os.path.exists(path):
      sys.exit(f"sandbox_ratings: {path} not found")
  t0 = time.perf_counter()
  model_dir = smollm2(a.models)
  print(f"model: {model_dir} ({time.perf_counter() - t0:.1f}s to find/convert)", flush=True)
  modes = a.modes.split(",")
  results, walls = {}, {m: [] for m in modes}
  with tempfile.TemporaryDirectory() as tmp, common.Run("sandbox_ratings", a.json) as run:
    backends = None
    for rep in range(a.reps):
      for mode in (modes if rep % 2 == 0 else modes[::-1]):
        cfg = society(model_dir, os.path.join(tmp, f"{mode}{rep}.sqlite"), a)
        cfg.rating_mode = mode
        if backends is None:
          t0 = time.perf_counter()
          backends = runner.make_backends(cfg)
          run.row("load s", f"{time.perf_counter() - t0:.1f}")
        t0 = time.perf_counter()
        runner.start(cfg, progress=False, backends=backends)
        walls[mode].append(time.perf_counter() - t0)
        s = Store(cfg.store)
        recs = export.records(s)
        s.close()
        got = usable(recs)
        if mode in results and got != results[mode]:
          raise SystemExit(f"{mode}: a second run of the same society read differently")
        results[mode] = got
        run.mark(f"{mode} run {rep} ({walls[mode][-1]:.0f}s)")
    for mode in modes:
      r = results[mode]
      run.row(mode, f"peer ratings usable {r['ratings_usable']:.1%} of {r['ratings']} "
              f"{r['ratings_by_source']}; observer scores usable {r['observer_usable']:.1%} of "
              f"{r['observer']} {r['observer_by_source']}; ratings given {r['rating_values']}, "
              f"moral scores {r['moral_values']}")
      run.row(f"{mode} wall", common.summary(walls[mode]) + " (the first run compiles)")
    run.data["results"] = results
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
