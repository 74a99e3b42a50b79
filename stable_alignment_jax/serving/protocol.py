"""The OpenAI wire format: request bodies (validated with pydantic) and error bodies.

Unknown fields are ignored, as OpenAI-compatible servers commonly do, but fields that would change
the meaning of the answer and that we do not implement (echo, suffix, penalties, tools,
logit_bias, JSON response formats, logprobs while streaming) are refused with a 400 naming the
field, never silently dropped. `logprobs` / `top_logprobs` are served (serving/logprobs.py), as are
vLLM's `continue_final_message` / `add_generation_prompt` in the combinations this server means:
a final assistant message is always continued, so a request asking to close it is refused.
"""

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # vLLM's and OpenAI's chat limit


class APIError(Exception):
  """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class StreamOptions(BaseModel):
  include_usage: bool = False


class _Common(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM-style extension (0 = off)
  n: int = Field(1, ge=1, le=32)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  frequency_penalty: float | None = None
  presence_penalty: float | None = None
  logit_bias: dict[str, float] | None = None

  def stops(self) -> list[str]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if any(s == "" for s in stop):
      raise APIError(400, "stop: stop strings must not be empty", param="stop")
    if len(stop) > 16:
      raise APIError(400, f"stop: at most 16 stop strings, got {len(stop)}", param="stop")
    return stop

  def refuse_unsupported(self, extra: dict[str, Any]):
    for name in ("frequency_penalty", "presence_penalty"):
      if getattr(self, name):
        raise APIError(400, f"{name} is not supported by this server", param=name)
    if self.logit_bias:
      raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    for name, value in extra.items():
      if value not in (None, False, [], {}):
        raise APIError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(_Common):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint
  logprobs: int | None = None
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None

  def check(self):
    self.refuse_unsupported({"echo": self.echo, "suffix": self.suffix})
    if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
      raise APIError(400, f"logprobs: must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
    if self.logprobs is not None and self.stream:
      raise APIError(400, "logprobs with stream is not supported by this server",
                     param="logprobs")
    if self.best_of is not None and self.best_of != self.n:
      raise APIError(400, "best_of other than n is not supported by this server", param="best_of")

  def prompt_list(self) -> list[str | list[int]]:
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if not p:
      raise APIError(400, "prompt: must not be empty", param="prompt")
    if isinstance(p[0], int):
      return [list(p)]  # one prompt given as token ids
    return list(p)


class ChatRequest(_Common):
  messages: list[dict[str, Any]] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=0)
  max_completion_tokens: int | None = Field(None, ge=0)
  logprobs: bool | None = None
  top_logprobs: int | None = None
  continue_final_message: bool | None = None  # vLLM's
  add_generation_prompt: bool | None = None  # vLLM's
  tools: list[Any] | None = None
  functions: list[Any] | None = None
  response_format: dict[str, Any] | None = None

  def check(self):
    self.refuse_unsupported({"tools": self.tools, "functions": self.functions})
    if self.top_logprobs is not None:
      if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}]",
                       param="top_logprobs")
      if self.top_logprobs and not self.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if self.logprobs and self.stream:
      raise APIError(400, "logprobs with stream is not supported by this server",
                     param="logprobs")
    last_assistant = isinstance(self.messages[-1], dict) and \
        self.messages[-1].get("role") == "assistant"
    if self.continue_final_message and self.add_generation_prompt:
      raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                     param="continue_final_message")
    if self.continue_final_message and not last_assistant:
      raise APIError(400, "continue_final_message: the last message must be the assistant's",
                     param="continue_final_message")
    if last_assistant and (self.continue_final_message is False or self.add_generation_prompt):
      raise APIError(400, "this server continues a final assistant message; closing it and "
                     "opening a new reply is not supported", param="continue_final_message")
    if self.response_format and self.response_format.get("type") != "text":
      raise APIError(400, "response_format: only {'type': 'text'} is supported",
                     param="response_format")

  def requested_max_tokens(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[BaseModel], body: Any):
  """Validates a decoded JSON body; the first problem becomes a 400 naming the field."""
  if not isinstance(body, dict):
    raise APIError(400, "the request body must be a JSON object")
  try:
    return model.model_validate(body)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, str) or x not in _UNION_TAGS)
    param = str(err["loc"][0]) if err["loc"] else None
    raise APIError(400, f"{loc or 'body'}: {err['msg']}", param=param,
                   code=_CODES.get(err["type"])) from None


# pydantic names union members in `loc` (e.g. ("prompt", "str")); they mean nothing to a client.
_UNION_TAGS = {"str", "int", "list[str]", "list[int]", "list[list[int]]"}
_CODES = {"missing": "missing_required_parameter"}
