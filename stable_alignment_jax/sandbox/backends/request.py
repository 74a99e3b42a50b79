"""One model call (`Request`), in a module of its own so that backend helpers can build one
without importing the backends package that imports them."""

import dataclasses
import hashlib
import json


@dataclasses.dataclass(frozen=True)
class Request:
  """One model call. `prompt` is the user's message; `system` an optional system message;
  `prefix` the start of the model's own reply, which it continues (a chat backend puts it after
  the template's assistant header); `choices`, when given, makes this a choice call."""
  backend: str  # name in config.backends
  model: str
  prompt: str
  max_tokens: int
  temperature: float
  top_p: float
  seed: int
  system: str = ""
  prefix: str = ""
  choices: tuple[str, ...] = ()

  def params(self) -> dict:
    return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}

  @property
  def key(self) -> str:
    """Identity of the call for record/replay: everything that determines its output. The
    newer fields enter only when set, so the calls of older run stores keep their keys."""
    parts = [self.backend, self.model, self.prompt, self.params(), self.seed]
    extra = {k: v for k, v in (("system", self.system), ("prefix", self.prefix),
                                ("choices", list(self.choices))) if v}
    if extra:
      parts.append(extra)
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
