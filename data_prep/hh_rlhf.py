"""Anthropic HH-RLHF preference pairs -> the alignment dataset contract (TFDS `hh_rlhf`).

  python -m data_prep.hh_rlhf --data_dir=../shared/data/hh_rlhf --out=data/tfds

Input: the files in their own format, gzip (or plain) JSON Lines with two strings `chosen` and
`rejected`, each a whole dialogue "\\n\\nHuman: ...\\n\\nAssistant: ..." that share everything up to
the final Assistant turn. Both layouts are found: the repository's `<subset>/<split>.jsonl.gz`
and the flat `<subset>_<split>.jsonl.gz` of ../shared/data/hh_rlhf.

One line -> one example: prompt = the dialogue up to and including the last "Assistant:"
(leading blank lines removed), responses = [chosen reply, rejected reply] (stripped), ratings =
[CHOSEN_RATING, REJECTED_RATING], turns = the prompt's Human/Assistant turns as chat turns (user
first, alternating, ending with the user's; empty when the dialogue does not alternate, so
training renders that example only in the stored layout). Pairs are not grouped by prompt: their
ratings only order the two replies of one comparison. Splits keep the file's own name (`train`,
`test`), so train with `data.dataset="hh_rlhf/all"`, `data.eval_split="test"`.

Configs: `all` (every subset found) and one per subset (`harmless_base`, `helpful_base`, ...).
Lines that break the format are rejected (file:line: reason); well-formed pairs that cannot make
an example (the dialogues differ before the last turn, an empty reply, identical replies) are
dropped and counted. For every file, lines = examples + rejected + dropped (in the card).
"""

import collections
import gzip
import json
import os
import re
import sys

from absl import app, flags
import tensorflow_datasets as tfds

from data_prep import card as card_lib
from data_prep import tfds_writer
from data_prep.export import Rejection, json_line

ASSISTANT = "\n\nAssistant:"
CHOSEN_RATING, REJECTED_RATING = 1.0, 0.0  # only the order matters to the preference losses
SUBSETS = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection_sampled")
# <subset>/<split>.jsonl[.gz] (the official repository) or <subset>_<split>.jsonl[.gz] (flat copy)
_FILE = re.compile(r"(?:^|/)(?P<subset>[a-z-]+)[/_](?P<split>train|test)\.jsonl(?:\.gz)?$")


class HhRlhf(tfds.core.GeneratorBasedBuilder):
  """Anthropic HH-RLHF chosen/rejected pairs as prompt + 2 rated responses."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Prompt up to the last Assistant turn; chosen 1.0, rejected 0.0.",
                   "1.1.0": "`turns`: the dialogue as chat turns, for chat templates."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="all", description="every subset found")] + [
      tfds.core.BuilderConfig(name=s, description=f"the {s} subset") for s in SUBSETS]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds_writer.features(),
        homepage="https://github.com/anthropics/hh-rlhf")

  def _split_generators(self, dl_manager):
    raise ValueError("hh_rlhf is built from the HH-RLHF files: run "
                     "`python -m data_prep.hh_rlhf --data_dir=... --out=...`")

  def _generate_examples(self):
    raise NotImplementedError


def find_files(data_dir: str) -> dict[tuple[str, str], str]:
  """(subset, split) -> path, for every HH-RLHF preference file under `data_dir`."""
  found = {}
  for root, _, names in os.walk(data_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      m = _FILE.search(os.path.relpath(path, data_dir).replace(os.sep, "/"))
      if m:
        subset = m["subset"].replace("-", "_")
        if subset in SUBSETS:
          found[(subset, m["split"])] = path
  return dict(sorted(found.items()))


class _Skip(Exception):
  def __init__(self, kind: str, reason: str, category: str = ""):
    super().__init__(reason)
    self.kind = kind  # "rejected" (the line breaks the format) or "dropped" (no example)
    self.category = category or reason  # what the card counts rejections by


_SPEAKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def dialogue_turns(prompt: str) -> list[str]:
  """"Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" -> ["a", "b", "c"]; [] when the
  speakers do not alternate from Human to a final Human turn."""
  parts = _SPEAKER.split("\n\n" + prompt)
  if parts[0].strip():
    return []
  speakers, texts = parts[1::2], [t.strip() for t in parts[2::2]]
  if speakers[-1:] == ["Assistant"] and not texts[-1]:
    speakers, texts = speakers[:-1], texts[:-1]  # the open reply the responses fill
  want = ["Human" if i % 2 == 0 else "Assistant" for i in range(len(speakers))]
  if not speakers or speakers != want or speakers[-1] != "Human":
    return []
  return texts


def pair_example(obj, source: str) -> dict:
  """A decoded line -> an example dict; `_Skip` naming the field and problem otherwise."""
  if not isinstance(obj, dict):
    raise _Skip("rejected", f"expected a JSON object, got {type(obj).__name__}", "wrong type")
  texts = {}
  for key in ("chosen", "rejected"):
    if key not in obj:
      raise _Skip("rejected", f"missing field {key}", "missing field")
    if not isinstance(obj[key], str):
      raise _Skip("rejected", f"field {key}: expected a string, got {type(obj[key]).__name__}",
                    "wrong type")
    cut = obj[key].rfind(ASSISTANT)
    if cut < 0:
      raise _Skip("rejected", f"field {key}: no Assistant turn", "no Assistant turn")
    texts[key] = (obj[key][:cut + len(ASSISTANT)], obj[key][cut + len(ASSISTANT):].strip())
  (prompt, chosen), (prompt_r, rejected) = texts["chosen"], texts["rejected"]
  if prompt != prompt_r:
    raise _Skip("dropped", "chosen and rejected differ before the last Assistant turn")
  if not chosen or not rejected:
    raise _Skip("dropped", "empty " + ("chosen" if not chosen else "rejected") + " reply")
  if chosen == rejected:
    raise _Skip("dropped", "chosen and rejected replies are identical")
  prompt = prompt.lstrip()
  return {"prompt": prompt, "responses": [chosen, rejected],
          "ratings": [CHOSEN_RATING, REJECTED_RATING], "stage": "hh_rlhf", "source": source,
          "turns": dialogue_turns(prompt)}


def read_file(path: str, source: str):
  """(examples, rejections, drops Counter, line count) of one HH-RLHF file."""
  examples, rejections, drops, n = [], [], collections.Counter(), 0
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      ok, obj = json_line(path, n, raw, rejections)
      if not ok:
        continue
      try:
        examples.append(pair_example(obj, source))
      except _Skip as e:
        if e.kind == "rejected":
          rejections.append(Rejection(path, n, str(e), e.category))
        else:
          drops[str(e)] += 1
  return examples, rejections, drops, n


def card_path(out_dir: str) -> str:
  return os.path.join(out_dir, "hh_rlhf", f"card-{HhRlhf.VERSION}.json")


def build(data_dir: str, out_dir: str) -> dict:
  """Every HH-RLHF file under `data_dir` -> TFDS `hh_rlhf/<config>` under `out_dir`; the card.

  Re-running replaces the datasets of this version (each swapped in only when complete).
  """
  files = find_files(data_dir)
  if not files:
    raise FileNotFoundError(f"{data_dir}: no HH-RLHF files (<subset>/<split>.jsonl.gz or "
                            f"<subset>_<split>.jsonl.gz with subset in {SUBSETS})")
  per_file, by_config, rejections = {}, collections.defaultdict(dict), []
  for (subset, split), path in files.items():
    exs, rej, drops, lines = read_file(path, f"hh-rlhf/{subset}")
    rejections += rej
    per_file[path] = {"subset": subset, "split": split, "lines": lines, "examples": len(exs),
                      "rejected": len(rej), "dropped": dict(drops)}
    by_config[subset][split] = exs
    by_config["all"].setdefault(split, []).extend(exs)
  datasets = {}
  for config, splits in by_config.items():
    path = tfds_writer.write_prepared(
        lambda d, config=config: HhRlhf(data_dir=d, config=config), out_dir, splits)
    datasets[config] = {"name": f"hh_rlhf/{config}:{HhRlhf.VERSION}", "path": path,
                        "splits": {s: card_lib.split_card(e) for s, e in splits.items()}}
  card = {"builder": "hh_rlhf", "version": str(HhRlhf.VERSION), "files": per_file,
          "rejected": card_lib.rejections_card(rejections), "datasets": datasets}
  card_lib.write_card(card, card_path(out_dir))
  return card


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  try:
    card = build(args.data_dir, args.out)
  except (OSError, ValueError) as e:
    print(f"data_prep.hh_rlhf: {e}", file=sys.stderr)
    return 2
  print(json.dumps(card, indent=2, ensure_ascii=False))
  for path, f in card["files"].items():
    print(f"{path}: {f['lines']} lines -> {f['examples']} examples, {f['rejected']} rejected, "
          f"dropped {f['dropped']}", file=sys.stderr)
  for r in card["rejected"]["first"]:
    print(f"  rejected {r}", file=sys.stderr)
  print(f"card: {card_path(args.out)}", file=sys.stderr)
  return 0


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module defines none."""
  flags.DEFINE_string("data_dir", None, "directory holding the HH-RLHF files")
  flags.DEFINE_string("out", None, "TFDS data_dir to write into")
  flags.mark_flags_as_required(["data_dir", "out"])
  app.run(main)


if __name__ == "__main__":
  cli()
