"""Helpers shared by the config files (big_vision style `parse_arg`)."""

import ml_collections

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


def model_block(preset_name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: every ModelConfig field, filled from a preset of model/presets.py."""
  cfg = presets.preset(preset_name, **overrides)
  fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
  return ml_collections.ConfigDict({"preset": preset_name, **fields})
