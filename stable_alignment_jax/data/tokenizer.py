"""Tokenizers: a SentencePiece `.model` file, or a checkpoint directory holding `tokenizer.model`
(SentencePiece, as LLaMA-2 ships) or `tokenizer.json` (HF fast tokenizer, as LLaMA-3 ships).

Every tokenizer offers the same small surface: `encode(text, bos=, eos=)`, `decode(ids)`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id` (pad falls back to EOS-free id 0 when the model has
none; padding is always masked, so its id only has to be valid), and what a checkpoint directory
says about prompting it:
- `add_bos`: whether a prompt starts with BOS (SentencePiece and byte: yes; a `tokenizer.json`
  directory: `add_bos_token` of tokenizer_config.json, else whether its post-processor adds BOS,
  so SmolLM2 gets none and LLaMA-3 its `<|begin_of_text|>`);
- `chat_template`: the jinja chat template (`chat_template.jinja`, else the `chat_template` key of
  tokenizer_config.json), None without one; `render_chat` renders it through transformers;
- `stop_ids`: the ids that end a generation: the tokenizer's EOS, generation_config.json's
  `eos_token_id` (an int or a list), and the template's end-of-turn token when it is one special
  token (`<|im_end|>`, `<|eot_id|>`).
"""

import functools
import json
import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  bos_text: str | None  # how BOS is spelled in text (a chat template may write it)
  add_bos: bool
  chat_template: str | None
  stop_ids: list[int]

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258 after <pad>=0, <s>=1, </s>=2: zero-dependency, for tiny runs."""

  vocab_size = 259
  pad_id, bos_id, eos_id = 0, 1, 2
  path = "byte"
  directory = None
  bos_text = None  # BOS has no text form here
  add_bos = True
  chat_template = None
  stop_ids = [2]

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    return [self.bos_id] * bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * eos

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


class _Directory:
  """What the files beside a tokenizer say: chat template, generation_config EOS, end of turn.
  Subclasses set `directory` (None for a bare .model file), `eos_id` and `_is_special(id)`."""

  directory: str | None = None
  eos_id: int = -1

  def _read(self, name: str):
    path = os.path.join(self.directory, name) if self.directory else ""
    if not path or not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      if name.endswith(".json"):
        try:
          return json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: not valid JSON ({e})") from None
      return f.read()

  @functools.cached_property
  def chat_template(self) -> str | None:
    text = self._read("chat_template.jinja")
    if text is None:
      text = (self._read("tokenizer_config.json") or {}).get("chat_template")
    if isinstance(text, list):  # the named-templates form: [{"name": "default", "template": ...}]
      named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
      text = named.get("default")
    return text or None

  @functools.cached_property
  def stop_ids(self) -> list[int]:
    ids = [self.eos_id] if self.eos_id >= 0 else []
    eos = (self._read("generation_config.json") or {}).get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    end = self._end_of_turn()
    ids += [end] if end is not None else []
    return sorted(set(ids))

  def _end_of_turn(self) -> int | None:
    """The first token after an assistant message in the rendered template, when special."""
    if self.chat_template is None:
      return None
    marker = "MARKER-9f3c"
    try:
      text = render_chat(self, [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": marker}],
                         add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no answer
      return None
    rest = text[text.find(marker) + len(marker):].lstrip() if marker in text else ""
    ids = self.encode(rest) if rest else []
    return ids[0] if ids and self._is_special(ids[0]) else None

  def _is_special(self, i: int) -> bool:
    raise NotImplementedError


class SentencePieceTokenizer(_Directory):

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = path
    parent = os.path.dirname(os.path.abspath(path))
    # Only a checkpoint's own tokenizer.model has its config files beside it.
    self.directory = parent if os.path.basename(path) == "tokenizer.model" else None
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.vocab_size()
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
    self.bos_text = self.sp.IdToPiece(self.bos_id) if self.bos_id >= 0 else None
    add = (self._read("tokenizer_config.json") or {}).get("add_bos_token")
    self.add_bos = (add if isinstance(add, bool) else True) and self.bos_id >= 0

  def _is_special(self, i: int) -> bool:
    return self.sp.IsControl(i)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer(_Directory):
  """A `tokenizer.json` read with the `tokenizers` library (no model code, no network)."""

  def __init__(self, directory: str):
    from tokenizers import Tokenizer as _Tok
    self.directory = directory
    self.path = os.path.join(directory, "tokenizer.json")
    self.tok = _Tok.from_file(self.path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    special = _special_tokens(directory)
    self.bos_id = self._id(special.get("bos_token"))
    self.eos_id = self._id(special.get("eos_token"))
    pad = self._id(special.get("pad_token"))
    self.pad_id = pad if pad >= 0 else 0
    self.bos_text = self.tok.id_to_token(self.bos_id) if self.bos_id >= 0 else None
    add = (self._read("tokenizer_config.json") or {}).get("add_bos_token")
    if not isinstance(add, bool):  # the post-processor decides, as transformers does then
      add = self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
    self.add_bos = add and self.bos_id >= 0

  def _is_special(self, i: int) -> bool:
    token = self.tok.get_added_tokens_decoder().get(i)
    return token is not None and token.special

  def _id(self, token) -> int:
    if isinstance(token, dict):
      token = token.get("content")
    if token is None:
      return -1
    i = self.tok.token_to_id(token)
    return -1 if i is None else i

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_tokens(directory: str) -> dict:
  out: dict = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      out.update({k: v for k, v in data.items() if k.endswith("_token") and v})
  return out


@functools.lru_cache(maxsize=8)
def _auto_tokenizer(directory: str):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(directory)


def render_chat(tok, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
  """OpenAI-style messages as text, by the tokenizer directory's own chat template, rendered by
  transformers exactly as `apply_chat_template(tokenize=False)` does (special tokens such as
  `bos_token` filled in from the directory)."""
  if getattr(tok, "chat_template", None) is None:
    raise ValueError(f"tokenizer {getattr(tok, 'path', tok)!r} has no chat template")
  return _auto_tokenizer(tok.directory).apply_chat_template(
      list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
      continue_final_message=continue_final_message)


_TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]


def _from_hub(repo_id: str) -> str:
  """The local snapshot directory of a Hugging Face hub repo's tokenizer files (cached; a gated
  repo such as meta-llama/* needs $HF_TOKEN). Offline, an already cached snapshot is used."""
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(repo_id, allow_patterns=_TOKENIZER_FILES)
  except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
    raise FileNotFoundError(f"tokenizer {repo_id!r}: not a local file or directory, and the "
                            f"Hugging Face hub could not provide it ({type(e).__name__}: {e})"
                            ) from None


def load_tokenizer(path: str) -> Tokenizer:
  """`byte`, a `.model` file, a directory with `tokenizer.model` (preferred) or `tokenizer.json`,
  or a Hugging Face hub id such as `meta-llama/Llama-2-7b-hf` (its tokenizer files only)."""
  if path == "byte":
    return ByteTokenizer()
  if (not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "~"))
      and not path.endswith(".model")):
    path = _from_hub(path)
  if os.path.isfile(path):
    return SentencePieceTokenizer(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "tokenizer.model")):
      return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return HFTokenizer(path)
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
  raise FileNotFoundError(f"tokenizer not found: {path}")
