"""Reading JSONL files line by line with errors that name the file and line."""

import gzip
import json
from typing import Any, Iterator


def parsed_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, value) for each non-blank line (`.gz` read transparently); a line that is
  not JSON gives its `json.JSONDecodeError` as the value, so a reader may skip it or stop."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield n, json.loads(line)
      except json.JSONDecodeError as e:
        yield n, e


def records(path: str, *, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
  """(line number, value) for each non-blank line; a line that is not JSON raises
  `error("path:line: not valid JSON (...)")`."""
  for n, value in parsed_lines(path):
    if isinstance(value, json.JSONDecodeError):
      raise error(f"{path}:{n}: not valid JSON ({value})")
    yield n, value
