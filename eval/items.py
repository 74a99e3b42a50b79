"""What every benchmark loader returns, and the file reading they share.

A multiple-choice benchmark is a list of `MCItem`: a context, its candidate continuations and the
index of the right one; the scorer compares log p(choice | context). A generation benchmark is a
list of `GenItem`: a prompt for our model and the question the judge sees. Files are read in their
official formats; a missing file names where it is expected and where to download it, a malformed
row names the file, the row number and the field.
"""

import csv
import dataclasses
import os
import sys
import tarfile
import urllib.request
from typing import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class MCItem:
  id: str
  context: str
  choices: tuple[str, ...]
  label: int  # index into choices
  task: str  # e.g. "truthfulqa_mc1", "ethics/justice/test"
  group: str | None = None  # items scored jointly for exact match (ETHICS groups)

  def __post_init__(self):
    if not 0 <= self.label < len(self.choices):
      raise ValueError(f"{self.task} item {self.id}: label {self.label} outside "
                       f"{len(self.choices)} choices")


@dataclasses.dataclass(frozen=True)
class GenItem:
  id: str
  question: str  # what the judge is told the user asked
  prompt: str  # what our model is given (the question plus any adversarial framing)
  task: str
  source: str = ""  # e.g. "hh_rlhf/harmless-base", "advbench/template2"


class BenchmarkFileError(ValueError):
  """A benchmark file exists but a record in it is unusable."""


# The benchmark files' home unless a config says otherwise: $STABLE_ALIGNMENT_DATA, else a
# per-user cache directory (files are fetched into it on first use when online).
DATA_ENV = "STABLE_ALIGNMENT_DATA"


def default_data_dir() -> str:
  if os.environ.get(DATA_ENV):
    return os.path.expanduser(os.environ[DATA_ENV])
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "stable_alignment_jax", "data")


_HOW = (f"put it there, set ${DATA_ENV} or --config.data_dir to a directory that holds it, or "
        "run once online with --config.fetch=True")

# Where each file comes from, for the missing-file message and `fetch`.
SOURCES = {
    "truthfulqa/mc_task.json":
        "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/v0/mc_task.json",
    "ethics/": "https://people.eecs.berkeley.edu/~hendrycks/ethics.tar",
    "moral_stories/":
        "https://github.com/demelin/moral_stories (moral_stories_datasets.tar.xz: "
        "generation/norm|actions+context+consequences/norm_distance/test.jsonl)",
    "hh_rlhf/harmless-base_test.jsonl.gz":
        "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/test.jsonl.gz",
    "hh_rlhf/helpful-base_test.jsonl.gz":
        "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz",
    "advbench/harmful_behaviors.csv":
        "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/"
        "harmful_behaviors.csv",
    "MIC.csv": "https://github.com/SALT-NLP/mic (Dropbox link after the data-use agreement)",
    # SANDBOX's question pool: the HH-RLHF questions of the paper's release.
    "sandbox_questions/hh_questions.txt":
        "https://raw.githubusercontent.com/agi-templar/Stable-Alignment/main/assets/hh-rlhf/"
        "question.txt",
}


def source_of(rel: str) -> str:
  for key, url in SOURCES.items():
    if rel == key or (key.endswith("/") and rel.startswith(key)):
      return url
  return "the benchmark's official release"


def data_file(data_dir: str, rel: str) -> str:
  """Path of a benchmark file, or FileNotFoundError naming it and its download source."""
  path = os.path.join(data_dir, rel)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"benchmark file missing: {path} (download from {source_of(rel)}; "
                            f"{_HOW})")
  return path


def fetch(data_dir: str, rel: str) -> str:
  """Downloads one file (or, for ETHICS, the official tarball's member) into data_dir."""
  path = os.path.join(data_dir, rel)
  if os.path.isfile(path):
    return path
  url = source_of(rel)
  if not url.startswith("https://") or " " in url:
    raise FileNotFoundError(f"benchmark file missing: {path} (no direct download: get it from "
                            f"{url}; then put it there, or set ${DATA_ENV} or --config.data_dir "
                            f"to a directory that holds it)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  print(f"fetching {url}", file=sys.stderr)
  try:
    if url.endswith(".tar"):
      tar_path = os.path.join(data_dir, os.path.basename(url))
      if not os.path.isfile(tar_path):
        _download(url, tar_path)
      with tarfile.open(tar_path) as tar:  # members are named ethics/<subset>/<file>
        member = tar.getmember(rel)
        tar.extract(member, data_dir, filter="data")
    else:
      _download(url, path)
  except OSError as e:  # offline, DNS, HTTP errors: what is missing and how to get it
    raise FileNotFoundError(f"benchmark file missing: {path}; fetching {url} failed "
                            f"({type(e).__name__}: {e}); {_HOW}") from None
  return path


def _download(url: str, path: str, timeout: float = 60.0) -> None:
  """`url` to `path` through a `.part` file, so an interrupted download leaves no bad file."""
  with urllib.request.urlopen(url, timeout=timeout) as r, open(path + ".part", "wb") as f:
    while chunk := r.read(1 << 20):
      f.write(chunk)
  os.replace(path + ".part", path)


def read_csv(path: str, columns: Sequence[str] | None, *, header: bool = True
             ) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (line where the row starts, 1-based counting the header, {column: value}).

  With `header`, the header must contain `columns`; without, `columns` names the positions.
  A row with the wrong number of fields raises naming the file and row.
  """
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    if header:
      names = next(reader, None)
      if names is None:
        raise BenchmarkFileError(f"{path}: empty file, expected a header with {list(columns)}")
      missing = [c for c in columns or () if c not in names]
      if missing:
        raise BenchmarkFileError(f"{path}: header {names} lacks columns {missing}")
    else:
      names = list(columns)
    end = reader.line_num
    for row in reader:
      line, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
      if not row:
        continue
      if len(row) != len(names):
        raise BenchmarkFileError(f"{path}:{line}: row has {len(row)} fields, "
                                 f"expected {len(names)} ({names})")
      yield line, dict(zip(names, row))


def int_field(path: str, line: int, row: dict, name: str, allowed=None) -> int:
  value = row[name]
  try:
    out = int(float(value))
  except ValueError:
    raise BenchmarkFileError(f"{path}:{line}: field {name!r}: "
                             f"{value!r} is not a number") from None
  if allowed is not None and out not in allowed:
    raise BenchmarkFileError(f"{path}:{line}: field {name!r}: {out} not in "
                             f"{sorted(allowed)}")
  return out
