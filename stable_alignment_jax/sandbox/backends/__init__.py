"""Model backends: where agents' prompts are completed.

A backend takes a list of `Request`s and returns their texts in order (`async complete`), and
may score a choice (`async choose`: the log-probabilities of `Request.choices` as the next token
after the prompt and `prefix`, or None per request when it cannot tell).
Registry (`KINDS`, config `backends.<name>.kind`):
- `openai`: any OpenAI-compatible server (OpenAI, vLLM, Ollama, our serve.py) via the SDK.
- `jax`: our model in process; all pending prompts of a step go through ONE batched generate.
Record/replay (`replay.CallLog`) sits in front of every backend.
"""

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


# Backend kinds that can score a choice (`choose`); `rating_mode=auto` uses choice on these.
CHOICE_KINDS = ("jax", "openai")


def _openai(name, cfg, model_names):
  from stable_alignment_jax.sandbox.backends.openai_backend import OpenAIBackend
  return OpenAIBackend(name, cfg)  # the server decides which model names it knows


def _jax(name, cfg, model_names):
  from stable_alignment_jax.sandbox.backends.jax_backend import JaxBackend
  return JaxBackend(name, cfg, model_names)


KINDS = {"openai": _openai, "jax": _jax}


def check_backend_config(name: str, cfg) -> None:
  if "kind" not in cfg:
    raise KeyError(f"config.backends.{name}: missing `kind`; known kinds: {sorted(KINDS)}")
  if cfg.kind not in KINDS:
    raise KeyError(f"config.backends.{name}.kind={cfg.kind!r}: unknown backend; known: "
                   f"{sorted(KINDS)}")


def make_backend(name: str, cfg, model_names=None):
  """`model_names`: the model names the society will send to this backend (checked up front
  where the backend can tell)."""
  check_backend_config(name, cfg)
  return KINDS[cfg.kind](name, cfg, model_names)
