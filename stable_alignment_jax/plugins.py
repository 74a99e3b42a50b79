"""Code a config names by a "package.module:attribute" string: the one way configs plug code
from outside the library (experiments, demo worlds) into it without the library importing that
code. Used by `pipeline_class` and `world.write` (pipeline) and `extra_tasks` (eval)."""

import importlib


def load(spec: str, key: str):
  """The object `spec` names; `key` is the config key it came from, for the error message."""
  module, sep, attr = spec.partition(":")
  if not sep or not module or not attr:
    raise ValueError(f"config {key}={spec!r}: expected 'package.module:attribute'")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config {key}={spec!r}: {type(e).__name__}: {e}") from None
