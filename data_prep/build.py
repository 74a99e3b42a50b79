"""SANDBOX exports -> the three alignment datasets (TFDS `sandbox_alignment`, array_record).

  python -m data_prep.build --export=runs/a.jsonl,runs/b.jsonl --out=data/alignment \
      [--ratio=5:1:1] [--seed=0] [--validation_percent=5]

Writes `OUT/sandbox_alignment/{imitation,self_critic,realignment}/1.3.0/` (train and validation
splits, split by a hash of the question) and the dataset card `OUT/sandbox_alignment/
card-1.3.0.json`, which is also printed. Read back without TensorFlow:
`stable_alignment_jax.data.loader.open_tfds("sandbox_alignment/imitation", data_dir=OUT,
split="train")`.

Bad lines are rejected with file:line and reason and the rest is built; the card lists them.
Re-running on the same OUT is safe: each dataset of this version is rebuilt beside the old one
and swapped in only when complete (the old one stays readable until then), and the card is
replaced. A run that fails (missing export, bad ratio) leaves what was there untouched.
"""

import collections
import json
import os
import sys
import time
from typing import Mapping, Sequence

from absl import app, flags

from data_prep import alignment_examples as ax
from data_prep import card as card_lib
from data_prep import export as export_lib
from data_prep import sandbox_alignment as sa
from data_prep import tfds_writer

DEFAULT_VALIDATION_PERCENT = 5.0


def _ratio(ratio) -> dict[str, float] | None:
  """None, "5:1:1", a 3-sequence in KINDS order, or a {kind: weight} mapping."""
  if ratio is None or ratio == "":
    return None
  if isinstance(ratio, str):
    return ax.parse_ratio(ratio)
  if isinstance(ratio, Mapping):
    unknown = set(ratio) - set(ax.KINDS)
    if unknown:
      raise ValueError(f"ratio: unknown kinds {sorted(unknown)}; expected {ax.KINDS}")
    return ax.parse_ratio(":".join(str(ratio.get(k, 0)) for k in ax.KINDS))
  return ax.parse_ratio(":".join(str(v) for v in ratio))


def card_path(out_dir: str) -> str:
  return os.path.join(out_dir, "sandbox_alignment", f"card-{sa.SandboxAlignment.VERSION}.json")


def build(exports: Sequence[str], out_dir: str, *, ratio=None, seed: int = 0,
          validation_percent: float = DEFAULT_VALIDATION_PERCENT,
          realignment_form: str = "per_reason") -> dict:
  """Builds the three datasets under `out_dir` and saves the card; returns the card (a dict).

  `ratio`: None (keep everything) or the relative sizes of imitation:self_critic:realignment
  ("5:1:1", (5, 1, 1) or a dict); `seed` picks which examples the ratio keeps.
  `realignment_form`: per_reason (the authors' release) | bulleted (alignment_examples.py).
  """
  if isinstance(exports, str):
    exports = [exports]
  if not exports:
    raise ValueError("no export files given")
  if not 0 <= validation_percent < 100:
    raise ValueError(f"validation_percent={validation_percent}: expected 0 <= p < 100")
  weights = _ratio(ratio)
  missing = [p for p in exports if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"export file(s) not found: {missing}")
  start = time.perf_counter()
  records, rejections, lines = export_lib.read_exports(exports)
  examples, drops = ax.build_examples(records, realignment_form)
  if weights:
    empty = [k for k, w in weights.items() if w > 0 and not examples[k]]
    if empty:
      raise ValueError(f"ratio {ratio}: no {', '.join(empty)} examples to sample from "
                       f"(counts: { {k: len(v) for k, v in examples.items()} })")
    examples = ax.apply_ratio(examples, weights, seed, drops)
  datasets = {}
  for kind in ax.KINDS:
    splits = sa.split_examples(examples[kind], validation_percent)
    path = tfds_writer.write_prepared(
        lambda d, kind=kind: sa.SandboxAlignment(data_dir=d, config=kind), out_dir, splits)
    datasets[kind] = {"name": f"sandbox_alignment/{kind}:{sa.SandboxAlignment.VERSION}",
                      "path": path,
                      "examples": len(examples[kind]),
                      "responses_per_example": card_lib.responses_per_example(examples[kind]),
                      "splits": {s: card_lib.split_card(exs) for s, exs in splits.items()}}
  seconds = time.perf_counter() - start
  n_examples = sum(d["examples"] for d in datasets.values())
  card = {
      "builder": "sandbox_alignment", "version": str(sa.SandboxAlignment.VERSION),
      "inputs": lines, "records": len(records), "rejected": card_lib.rejections_card(rejections),
      "scores_by_source": card_lib.sources_card(records),
      "dropped": dict(sorted(collections.Counter(drops).items())),
      "ratio": None if weights is None else ":".join(f"{weights[k]:g}" for k in ax.KINDS),
      "seed": seed, "validation_percent": validation_percent,
      "realignment_form": realignment_form, "datasets": datasets,
      "examples": n_examples, "seconds": round(seconds, 3),
      "examples_per_s": round(n_examples / max(seconds, 1e-9), 1),
  }
  card_lib.write_card(card, card_path(out_dir))
  return card


def summary(card: dict) -> str:
  """A few human lines for the end of a run (the card itself is printed as JSON)."""
  lines = [f"built {card['examples']} examples from {card['records']} records in "
           f"{card['seconds']:.1f}s ({card['examples_per_s']:.0f} examples/s)"]
  for kind, d in card["datasets"].items():
    counts = ", ".join(f"{s} {c['examples']}" for s, c in d["splits"].items())
    k = d.get("responses_per_example") or {}
    lines.append(f"  {d['name']}: {counts}; K (responses per example) mean {k.get('mean')}, "
                 f"distribution {k.get('distribution')}  -> {d['path']}")
  rej = card["rejected"]
  if rej["count"]:
    lines.append(f"rejected {rej['count']} line(s): {rej['by_reason']}")
    lines += [f"  {r}" for r in rej["first"]]
    if rej["count"] > len(rej["first"]):
      lines.append(f"  ... and {rej['count'] - len(rej['first'])} more")
  if card["dropped"]:
    lines.append("left out: " + "; ".join(f"{k}: {v}" for k, v in card["dropped"].items()))
  return "\n".join(lines)


def _split_paths(text: str) -> list[str]:
  return [p for p in text.split(",") if p]


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  exports = [p for group in args.export for p in _split_paths(group)]
  try:
    card = build(exports, args.out, ratio=args.ratio, seed=args.seed,
                 validation_percent=args.validation_percent,
                 realignment_form=args.realignment_form)
  except (OSError, ValueError) as e:
    print(f"data_prep.build: {e}", file=sys.stderr)
    return 2
  print(json.dumps(card, indent=2, ensure_ascii=False))
  print(summary(card), file=sys.stderr)
  print(f"card: {card_path(args.out)}", file=sys.stderr)
  return 0


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module defines none."""
  flags.DEFINE_multi_string("export", None, "SANDBOX export JSONL file(s), comma-separated or "
                            "repeated")
  flags.DEFINE_string("out", None, "TFDS data_dir to write into")
  flags.DEFINE_string("ratio", None, "imitation:self_critic:realignment, e.g. 5:1:1")
  flags.DEFINE_integer("seed", 0, "shuffle and split seed")
  flags.DEFINE_float("validation_percent", DEFAULT_VALIDATION_PERCENT, "held-out share")
  flags.DEFINE_enum("realignment_form", "per_reason", list(ax.REALIGNMENT_FORMS),
                    "per_reason: one (reason + revision) response per rated peer, the authors' "
                    "form; bulleted: one response listing every reason (before 1.3.0)")
  flags.mark_flags_as_required(["export", "out"])
  app.run(main)


if __name__ == "__main__":
  cli()
