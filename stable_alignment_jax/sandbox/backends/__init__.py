"""Model backends: where agents' prompts are completed.

A backend takes a list of `Request`s and returns their texts in order (`async complete`), and
may score a choice (`async choose`: the log-probabilities of `Request.choices` as the next token
after the prompt and `prefix`, or None per request when it cannot tell).
Registry (`KINDS`, config `backends.<name>.kind`):
- `openai`: any OpenAI-compatible server (OpenAI, vLLM, Ollama, our serve.py) via the SDK.
- `jax`: our model in process; all pending prompts of a step go through ONE batched generate.
Record/replay (`replay.CallLog`) sits in front of every backend.
"""

from stable_alignment_jax.sandbox.backends.request import Request  # noqa: F401 - the package's API


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
