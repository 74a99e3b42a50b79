"""Train a small SentencePiece BPE tokenizer on dataset text (for the tiny configs).

  python -m data_prep.tokenizer --input=data/tfds/sandbox_alignment,runs/a.jsonl \
      --out=data/tok/sandbox --vocab_size=1024

writes `data/tok/sandbox.model` (+ `.vocab`), loadable with
`stable_alignment_jax.data.tokenizer.load_tokenizer("data/tok/sandbox.model")`.

`--input` (comma-separated or repeated) takes plain text files (one text a line), JSON Lines
files, gzip or not (every string value of every record: SANDBOX exports, HH-RLHF), and
directories, searched for built array_record datasets (every text feature but `stage` and
`source`). Texts are cut at newlines into training sentences.

The model follows LLaMA's choices so that our pipeline treats it like LLaMA's own: BPE, ids
unk=0, bos=1, eos=2 (plus pad=3, which LLaMA lacks), byte fallback (every string encodes, no
<unk>), digits split, identity normalisation without whitespace clean-up, so decode(encode(x))
gives x back, newlines and runs of spaces included.
"""

import gzip
import json
import os
import sys
from typing import Iterable, Iterator

from absl import app, flags

SKIP_FEATURES = {"stage", "source"}  # labels, not language


def _strings(value) -> Iterator[str]:
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


def _jsonl_texts(path: str) -> Iterator[str]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"data_prep.tokenizer: {path}:{n}: skipped, not JSON ({e})", file=sys.stderr)
        continue
      yield from _strings(obj)


def _array_record_texts(path: str) -> Iterator[str]:
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for record in reader.read_all():
      for name, feat in tf_example_pb2.Example.FromString(record).features.feature.items():
        if name not in SKIP_FEATURES and feat.WhichOneof("kind") == "bytes_list":
          yield from (v.decode("utf-8") for v in feat.bytes_list.value)
  finally:
    reader.close()


def _plain_texts(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    yield from f


def input_files(inputs: Iterable[str]) -> list[str]:
  """Files to read: given files as they are, directories searched for array_record shards."""
  files = []
  for path in inputs:
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                     for name in names if ".array_record-" in name)
      if not found:
        raise FileNotFoundError(f"{path}: no array_record dataset files in this directory")
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"tokenizer input not found: {path}")
  return files


def texts(inputs: Iterable[str]) -> Iterator[str]:
  """Every training sentence (non-empty line of a text) of every input."""
  for path in input_files(inputs):
    if ".array_record-" in os.path.basename(path):
      source = _array_record_texts(path)
    elif path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
      source = _jsonl_texts(path)
    else:
      source = _plain_texts(path)
    for text in source:
      for line in text.split("\n"):
        if line.strip():
          yield line


def train(inputs: Iterable[str], model_prefix: str, *, vocab_size: int,
          max_sentences: int = 2_000_000, seed: int = 0) -> str:
  """Trains the model; returns the path of the `.model` file."""
  import sentencepiece as spm
  sentences = list(texts(inputs))
  if not sentences:
    raise ValueError(f"no text found in {list(inputs)}")
  if len(sentences) > max_sentences:  # our own seeded sample, so a run is reproducible
    import numpy as np
    keep = np.random.default_rng(seed).choice(len(sentences), max_sentences, replace=False)
    sentences = [sentences[i] for i in sorted(keep)]
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, max_sentence_length=1 << 16,
        shuffle_input_sentence=False,
        num_threads=min(os.cpu_count() or 1, 8), minloglevel=2)
  except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small corpus
    raise ValueError(f"SentencePiece training on {len(sentences)} sentences with "
                     f"vocab_size={vocab_size} failed: {e}") from None
  return model_prefix + ".model"


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  inputs = [p for group in args.input for p in group.split(",") if p]
  try:
    path = train(inputs, args.out, vocab_size=args.vocab_size, seed=args.seed)
  except (OSError, ValueError) as e:
    print(f"data_prep.tokenizer: {e}", file=sys.stderr)
    return 2
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(path)
  print(json.dumps({"model": path, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                    "eos_id": tok.eos_id, "pad_id": tok.pad_id}))
  return 0


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module defines none."""
  flags.DEFINE_multi_string("input", None, "text/JSONL files or dataset directories, "
                            "comma-separated or repeated")
  flags.DEFINE_string("out", None, "model prefix: writes OUT.model and OUT.vocab")
  flags.DEFINE_integer("vocab_size", 1024, "pieces in the vocabulary")
  flags.DEFINE_integer("seed", 0, "SentencePiece's sampling seed")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main)


if __name__ == "__main__":
  cli()
