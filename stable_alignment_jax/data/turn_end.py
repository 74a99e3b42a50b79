"""How a chat model's assistant turn ends, per family, read from its own template.

A training row of the chat format ends where the template ends an assistant turn: ChatML's
`<|im_end|>` (Qwen, SmolLM2), Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`. That token is not
always the tokenizer's EOS: a Qwen *base* tokenizer says EOS `<|endoftext|>` while its template
closes turns with `<|im_end|>`, and a row ending with both would teach the model a turn end it
never meets when served (the sampler stops at the first stop id). So the row ends with the
template's token alone, and EOS only where the template ends a turn with no stop token at all.

Stopping (`tokenizer.stop_ids`) is the union: the tokenizer's EOS, generation_config.json's
`eos_token_id` (Gemma lists `<eos>` and `<end_of_turn>`), and the template's end-of-turn token.
"""

# No whitespace at its edges: Gemma's and Llama 3's templates `trim` the content, and Python
# counts the ASCII separators (\x1c-\x1f) as whitespace too.
_MARKER = "END-OF-TURN-PROBE-7f3a"


def turn_end_ids(tokenizer, render) -> list[int]:
  """The ids a training response ends with under the chat template: the template's text after an
  assistant message, through its first stop id (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`);
  the tokenizer's EOS when that text holds no stop id.

  render(turns, add_generation_prompt=False) -> str renders user/assistant turns with the
  template (the prompt format's own renderer, so both agree on roles and options)."""
  rendered = render(["hi", _MARKER], add_generation_prompt=False)
  ids = tokenizer.encode(rendered[rendered.index(_MARKER) + len(_MARKER):])
  stops = set(getattr(tokenizer, "stop_ids", [])) | {tokenizer.eos_id}
  cut = next((i for i, t in enumerate(ids) if t in stops), None)
  return ids[:cut + 1] if cut is not None else [tokenizer.eos_id]
