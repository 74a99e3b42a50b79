"""Chat templates: OpenAI-style message lists -> one prompt string for a base/instruction model.

The default is the Alpaca layout Stable Alignment trains on (`### Instruction:` / `### Response:`,
with Alpaca's one-line preamble as the default system text). A template is a handful of format
strings, so other layouts are a JSON file away (`load_template(path)`).

Message handling (the same for every template):
- `system` (and OpenAI's newer `developer`) messages are joined, in order, into one system block
  at the top; when there is none the template's `default_system` is used ("" = no block).
- `user` / `assistant` turns are rendered in order with `user` / `assistant`.
- If the last message is from the assistant, its text is left open (no trailing separator) and
  the model continues it; otherwise `generation_prompt` is appended for a fresh reply.
"""

import dataclasses
import json
from typing import Sequence

from stable_alignment_jax.contracts import ALPACA_PREAMBLE


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  default_system: str = ""
  system: str = "{content}\n\n"
  user: str = "### Instruction:\n{content}\n\n"
  assistant: str = "### Response:\n{content}\n\n"
  generation_prompt: str = "### Response:\n"
  # Text that marks the model starting the next turn on its own; chat requests stop there.
  stop: tuple[str, ...] = ("### Instruction:",)

  def __post_init__(self):
    for name in ("system", "user", "assistant"):
      if "{content}" not in getattr(self, name):
        raise ValueError(f"chat template field {name!r} must contain '{{content}}'")

  def render(self, messages: Sequence[dict]) -> str:
    return render(self, messages)


TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca": ChatTemplate(default_system=ALPACA_PREAMBLE),
    "alpaca_bare": ChatTemplate(),  # same layout, no preamble unless a system message is sent
    "plain": ChatTemplate(system="{content}\n\n", user="User: {content}\n",
                          assistant="Assistant: {content}\n", generation_prompt="Assistant:",
                          stop=("\nUser:",)),
}


def load_template(name_or_path: str) -> ChatTemplate:
  """A name from TEMPLATES, or a JSON file whose keys are ChatTemplate fields."""
  if name_or_path in TEMPLATES:
    return TEMPLATES[name_or_path]
  if not name_or_path.endswith(".json"):
    raise KeyError(f"unknown chat template {name_or_path!r}; known: {sorted(TEMPLATES)} "
                   "or a path to a .json file")
  with open(name_or_path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{name_or_path}: expected a JSON object of template fields")
  fields = {f.name for f in dataclasses.fields(ChatTemplate)}
  unknown = sorted(set(data) - fields)
  if unknown:
    raise ValueError(f"{name_or_path}: unknown chat template keys {unknown}; known: {sorted(fields)}")
  if "stop" in data:
    data["stop"] = tuple(data["stop"])
  return ChatTemplate(**data)


def message_text(message: dict, index: int) -> str:
  """The text of one message: a string, or a list of {"type": "text", "text": ...} parts."""
  content = message.get("content")
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for j, part in enumerate(content):
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
          part.get("text"), str):
        raise ValueError(f"messages[{index}].content[{j}]: only text parts are supported")
      texts.append(part["text"])
    return "".join(texts)
  raise ValueError(f"messages[{index}].content: expected a string or a list of text parts")


def normalize(messages: Sequence[dict]) -> list[dict]:
  """Messages checked and reduced to {"role", "content": str}; OpenAI's `developer` role is the
  older `system` (what chat templates know)."""
  if not messages:
    raise ValueError("messages: at least one message is required")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"messages[{i}]: expected an object with role and content")
    role = m.get("role")
    if role not in ("system", "developer", "user", "assistant"):
      raise ValueError(f"messages[{i}].role: unsupported role {role!r}; expected system, "
                       "developer, user or assistant")
    out.append({"role": "system" if role == "developer" else role,
                "content": message_text(m, i)})
  return out


def render(template: ChatTemplate, messages: Sequence[dict]) -> str:
  """The prompt string for `messages` (dicts with `role` and `content`)."""
  system, turns = [], []
  for m in normalize(messages):
    if m["role"] == "system":
      system.append(m["content"])
    else:
      turns.append((m["role"], m["content"]))
  system_text = "\n\n".join(system) if system else template.default_system
  parts = [template.system.format(content=system_text)] if system_text else []
  continuing = bool(turns) and turns[-1][0] == "assistant"
  for k, (role, text) in enumerate(turns):
    if continuing and k == len(turns) - 1:
      parts.append(template.assistant.split("{content}")[0] + text)  # left open
    else:
      parts.append(getattr(template, role).format(content=text))
  if not continuing:
    parts.append(template.generation_prompt)
  return "".join(parts)
