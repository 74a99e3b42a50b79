"""Helpers shared by the config files (big_vision style `parse_arg`)."""

import ml_collections

from stable_alignment_jax import contracts
from stable_alignment_jax.model import presets


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'tiny' or 'tiny,steps=20' style config args against typed defaults.

  A bare word sets a boolean default to True; `key=value` is converted to the default's type;
  unknown keys raise, naming the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise KeyError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config arg {key!r} needs a value ({kind.__name__})")
      out[key] = True
    elif kind is bool:
      if value not in ("true", "false", "True", "False", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a boolean")
      out[key] = value in ("true", "True", "1")
    else:
      out[key] = kind(value)
  return out


def tiny_world_model() -> ml_collections.ConfigDict:
  """The model of configs/pipeline.py:tiny (its society LM, stages, reward model and PPO): a
  2-layer, 128-wide LM over the world's 512-piece SentencePiece vocabulary."""
  return model_block("tiny", vocab_size=512, dim=128, ffn_dim=352, dtype="float32",
                     remat="none", max_seq_len=512)


def model_block(preset_name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: every ModelConfig field, filled from a preset of model/presets.py."""
  cfg = presets.preset(preset_name, **overrides)
  fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
  return ml_collections.ConfigDict({"preset": preset_name, **fields})


# The share of each later stage's batches that replays the earlier kinds (staged recipe): a
# quarter puts the earlier kinds in every batch of 8+ while 3/4 of each step stays on the
# stage's own data. It is a design default, not fitted to any result. On the toy society
# (experiments/toyworld/docs/results.md, 5 seeds, greedy held-out questions) it helps Stage 2
# and not Stage 3: IL+SC parses 0.33 of its answers with replay, 0.00 without (while still
# answering 0.86 of questions without it); IL+SC+RA parses 0.03 with replay and 0.01 without.
REPLAY_SHARE = 0.25
STAGE_KINDS = contracts.KINDS


def replay_mixture(kind: str, share: float, prefix: str = "sandbox_alignment"):
  """`config.data.mixture` of a staged-recipe stage: its own kind at 1 - share, the earlier
  kinds splitting `share` evenly (Stage 1 has none, so it is its own data alone)."""
  if not 0.0 <= share < 1.0:
    raise ValueError(f"replay share {share}: must be in [0, 1)")
  earlier = STAGE_KINDS[:STAGE_KINDS.index(kind)]
  entries = {kind: {"dataset": f"{prefix}/{kind}", "weight": 1.0 - share if earlier else 1.0}}
  for k in earlier:
    if share > 0:
      entries[k] = {"dataset": f"{prefix}/{k}", "weight": share / len(earlier)}
  return ml_collections.ConfigDict(entries)
