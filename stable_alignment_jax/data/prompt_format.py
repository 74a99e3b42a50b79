"""Training prompt formats: how an alignment example becomes prompt and response token ids.

"alpaca" takes the stored prompt (the paper's layout, what data_prep writes) behind BOS when the
tokenizer adds one (`add_bos`), and ends each response with EOS. "chat_template" renders the example's `turns` (user, assistant, ...,
user) with the tokenizer's own chat template and generation prompt, and ends each response with
the template's end-of-turn token, so a chat model is trained on the format it is served with.
"auto" (config `data.prompt_format`'s default) is chat_template when the tokenizer has a template
and the examples carry `turns`, else alpaca.

A row is tokenised as prompt + response in one text (`PromptFormat.row_ids` says how the mask's
start is found when a token straddles the boundary).
"""

import logging

import numpy as np

from stable_alignment_jax.data import turn_end

PROMPT_FORMATS = ("auto", "alpaca", "chat_template")


def text(x) -> str:
  """A stored string field as str (TFDS gives bytes)."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.bytes_):
    return bytes(x).decode("utf-8")
  return str(x)


class PromptFormat:
  """How an example becomes prompt and response ids under one tokenizer: "alpaca" (the stored
  prompt) or "chat_template" (the `turns` through the tokenizer's template). Picklable."""

  def __init__(self, tokenizer, name: str = "alpaca"):
    if name not in ("alpaca", "chat_template"):
      raise ValueError(f"prompt format {name!r}: expected alpaca or chat_template (resolve "
                       "auto with `resolve_prompt_format`)")
    if name == "chat_template" and getattr(tokenizer, "chat_template", None) is None:
      raise ValueError(f"data.prompt_format=chat_template: tokenizer "
                       f"{getattr(tokenizer, 'path', tokenizer)!r} has no chat template")
    self.tokenizer, self.name = tokenizer, name
    self.end = ([tokenizer.eos_id] if name == "alpaca" else
                turn_end.turn_end_ids(tokenizer, self._render))

  def _render(self, turns, **kw) -> str:
    from stable_alignment_jax.data.tokenizer import render_chat
    roles = ("user", "assistant")
    return render_chat(self.tokenizer, [{"role": roles[i % 2], "content": text(t)}
                                        for i, t in enumerate(turns)], **kw)

  def lead_and_text(self, ex: dict) -> tuple[list[int], str] | None:
    """(the ids before the prompt's text, the prompt's text): BOS when the tokenizer adds one
    (`add_bos`; never an id -1), and under chat_template a BOS the template writes itself is
    taken out of the text as one BOS id. None: the example has no chat form (empty `turns`)."""
    tok = self.tokenizer
    bos = [tok.bos_id] if getattr(tok, "add_bos", True) and tok.bos_id >= 0 else []
    if self.name == "alpaca":
      return bos, text(ex["prompt"])
    turns = ex.get("turns")
    if turns is None:
      raise ValueError(f"example with prompt {text(ex['prompt'])[:60]!r} has no `turns` (a "
                       "dataset built before data_prep wrote them?): rebuild it, or set "
                       "data.prompt_format=alpaca")
    if len(turns) == 0:
      return None
    rendered = self._render(turns, add_generation_prompt=True)
    bos_text = getattr(tok, "bos_text", None)
    if bos_text and tok.bos_id >= 0 and rendered.startswith(bos_text):
      return [tok.bos_id], rendered[len(bos_text):]  # the template writes BOS: one BOS id
    return bos, rendered

  def prompt_ids(self, ex: dict) -> list[int] | None:
    """None: the example has no chat form (empty `turns`)."""
    lt = self.lead_and_text(ex)
    return None if lt is None else lt[0] + self.tokenizer.encode(lt[1])

  def row_ids(self, lead: list[int], prompt_text: str, prompt: list[int],
              response) -> tuple[list[int], int]:
    """(a row's ids, how many of them are prompt): the lead, then prompt + response tokenised
    as ONE text (as the authors' code, TRL and our MC scorer do; tokenising the response apart
    would add SentencePiece's dummy-prefix space to it), then the end (EOS / end of turn).

    `prompt` is `prompt_ids` of the same example. The prompt part is the longest prefix the row
    shares with `prompt`; a token that straddles the boundary (a merge of the prompt's last
    characters with the response's first) differs from the prompt's own last token, so it and
    everything after it are response: the loss covers it, and the model conditions only on
    tokens that the prompt alone also yields."""
    joint = lead + self.tokenizer.encode(prompt_text + text(response))
    n = 0
    for a, b in zip(prompt, joint):
      if a != b:
        break
      n += 1
    return joint + self.end, n

  def response_ids(self, response) -> list[int]:
    """A response's ids tokenised on its own (for display and counting only: training rows come
    from `row_ids`, which tokenises prompt and response together)."""
    return self.tokenizer.encode(text(response)) + self.end


def resolve_prompt_format(name: str, tokenizer, first_example: dict | None) -> str:
  """auto -> chat_template when the tokenizer has a template and the examples carry `turns`
  (judged by the first: a dataset is built by one data_prep version), else alpaca."""
  if name not in PROMPT_FORMATS:
    raise ValueError(f"data.prompt_format={name!r}: expected one of {PROMPT_FORMATS}")
  if name != "auto":
    return name
  if getattr(tokenizer, "chat_template", None) is None:
    return "alpaca"
  if first_example is None or "turns" not in first_example:
    logging.warning("data: the tokenizer has a chat template but the examples have no `turns` "
                    "(built before data_prep wrote them); training prompts use the Alpaca layout")
    return "alpaca"
  return "chat_template"


def as_format(tokenizer, prompt_format) -> PromptFormat:
  return prompt_format if isinstance(prompt_format, PromptFormat) else PromptFormat(
      tokenizer, prompt_format)
