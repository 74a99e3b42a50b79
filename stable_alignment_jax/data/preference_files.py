"""TRL's standard dataset formats in (config `data.source = "trl"`): rows -> alignment examples.

The formats (TRL's "standard" dataset types), each plain (strings) or conversational (lists of
{"role", "content"} messages):
- preference: `prompt`, `chosen`, `rejected`. Conversational: `prompt` the messages up to the
  last user message, `chosen` / `rejected` one assistant message each (a list holding it, or the
  message itself). Without a `prompt` column (TRL's "implicit prompt"; also when chosen and
  rejected are whole conversations), the prompt is the longest shared prefix of chosen and
  rejected, as TRL's `extract_prompt` takes it (for plain text, Anthropic-HH style).
- prompt-completion: `prompt`, `completion` (SFT on the completion).
- conversational language modeling: `messages` (SFT): the last message, an assistant one, is
  the response, the messages before it the prompt (earlier assistant turns are context only).

Each row becomes one example of the alignment contract (data.py, DESIGN.md): a preference row
`responses [chosen, rejected]`, `ratings [1, 0]` (K = 2, chosen above rejected); an SFT row one
response rated 1. Plain rows carry the prompt text as is, as TRL uses plain text: under the
`alpaca` prompt format (what `auto` picks for rows without `turns`) it is tokenised behind BOS,
and each response ends with EOS. Conversational rows carry `turns` (user, assistant, ..., user),
which `data.prompt_format = auto | chat_template` renders with the model's chat template; and a
`prompt` in the Alpaca layout (chat_templates.py), for a tokenizer without a template. The
first good row fixes the file's form; a row of the other form is malformed (one format per
dataset, as `auto` judges by the first example). `turns` has no system role: system messages are
folded into the first user message ("system\n\nuser"), counted and logged.

Where from (`data.dataset`; `{split}` in it is replaced by the split's name):
- a `.jsonl` file (optionally `.gz`), read line by line here, so a bad line names its line
  number and the rest still load;
- a `.parquet` or `.json` (an array of rows) file, read with the `datasets` library;
- a hub dataset id or a local dataset directory: `datasets.load_dataset(id, split=split)`.
A single file without `{split}` is the train split; asking it for another split raises.

A malformed row (missing or ill-typed field, bad JSON, a conversation that does not alternate)
is skipped: each is logged with its file, row (line for JSONL, 0-based index otherwise) and field,
the count is in `source.skipped` and a summary warning. `data.bad_rows = "raise"` makes the first
one fatal. A dataset without one usable row raises.
"""

import json
import logging
import os

from stable_alignment_jax.data import chat_templates, jsonl

CHOSEN_RATING, REJECTED_RATING = 1.0, 0.0
BAD_ROWS = ("skip", "raise")
_LOGGED = 5  # malformed rows logged one by one; the rest are counted


class RowError(ValueError):
  """A malformed row: `field` names the column at fault."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field {field!r}: {problem}")
    self.field = field


# --- one row ------------------------------------------------------------------------------------

def _is_conversation(x) -> bool:
  return isinstance(x, (list, tuple)) or (isinstance(x, dict) and "role" in x)


def _messages(value, field: str) -> list[dict]:
  if isinstance(value, dict):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise RowError(field, f"expected a string or a list of messages, got {type(value).__name__}")
  try:
    return chat_templates.normalize(list(value))
  except ValueError as e:
    raise RowError(field, str(e)) from None


def _text(value, field: str) -> str:
  if not isinstance(value, str):
    raise RowError(field, f"expected a string, got {type(value).__name__}")
  return value


def _turns(messages: list[dict], field: str) -> tuple[list[str], bool]:
  """(turns user, assistant, ..., user; whether system text was folded into the first user turn)
  of prompt messages."""
  system = [m["content"] for m in messages if m["role"] == "system"]
  rest = [m for m in messages if m["role"] != "system"]
  roles = [m["role"] for m in rest]
  want = ["user", "assistant"] * (len(rest) // 2 + 1)
  if not rest or roles != want[:len(rest)] or roles[-1] != "user":
    raise RowError(field, f"the prompt messages must alternate user, assistant, ..., and end "
                          f"with a user message; got roles {[m['role'] for m in messages]}")
  turns = [m["content"] for m in rest]
  if system:
    turns[0] = "\n\n".join(system + [turns[0]])
  return turns, bool(system)


def _reply(value, field: str) -> str:
  """The one assistant message of a conversational chosen / rejected / completion."""
  msgs = _messages(value, field)
  if len(msgs) != 1 or msgs[0]["role"] != "assistant":
    raise RowError(field, f"expected one assistant message, got roles {[m['role'] for m in msgs]}")
  return msgs[0]["content"]


def _shared_prefix(chosen, rejected) -> int:
  """TRL's `extract_prompt` split point: the first position where chosen and rejected differ,
  one back for plain text when the character before it is a space."""
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
      break
  return idx


def _example(form: str, prompt, responses: list[str], ratings: list[float],
             field: str = "prompt") -> tuple[dict, str, bool]:
  if form == "plain":
    return {"prompt": prompt, "responses": responses, "ratings": ratings}, form, False
  turns, folded = _turns(prompt, field)
  alpaca = chat_templates.render(chat_templates.TEMPLATES["alpaca"], prompt)
  return ({"prompt": alpaca, "turns": turns, "responses": responses, "ratings": ratings}, form,
          folded)


def _preference(row: dict):
  chosen, rejected = row.get("chosen"), row.get("rejected")
  if chosen is None or rejected is None:
    raise RowError("chosen" if chosen is None else "rejected", "missing")
  rate = [CHOSEN_RATING, REJECTED_RATING]
  if _is_conversation(chosen) != _is_conversation(rejected):
    plain = "rejected" if _is_conversation(chosen) else "chosen"
    raise RowError(plain, "plain text, but the other response is messages")
  if not _is_conversation(chosen):
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if row.get("prompt") is None:  # implicit prompt
      cut = _shared_prefix(chosen, rejected)
      return _example("plain", chosen[:cut], [chosen[cut:], rejected[cut:]], rate, "chosen")
    return _example("plain", _text(row["prompt"], "prompt"), [chosen, rejected], rate)
  c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
  if c[0]["role"] != "assistant" or row.get("prompt") is None:  # whole conversations
    cut = _shared_prefix(c, r)
    if cut == 0:
      raise RowError("chosen", "no `prompt` column, and chosen and rejected share no prompt "
                               "messages")
    return _example("conversational", c[:cut], [_reply(c[cut:], "chosen"),
                                                 _reply(r[cut:], "rejected")], rate, "chosen")
  if not _is_conversation(row["prompt"]):
    raise RowError("prompt", "a string, but chosen and rejected are messages: give the prompt "
                             "as messages too")
  return _example("conversational", _messages(row["prompt"], "prompt"),
                  [_reply(c, "chosen"), _reply(r, "rejected")], rate)


def row_to_example(row) -> tuple[dict, str, bool]:
  """(example, form "plain" | "conversational", whether a system message was folded) of one
  row; raises `RowError` naming the field at fault."""
  if not isinstance(row, dict):
    raise RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
  if "chosen" in row or "rejected" in row:
    return _preference(row)
  if row.get("messages") is not None:
    msgs = _messages(row["messages"], "messages")
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
      raise RowError("messages", "expected the prompt messages, then the assistant reply last")
    return _example("conversational", msgs[:-1], [msgs[-1]["content"]], [CHOSEN_RATING],
                    "messages")
  if row.get("prompt") is not None and row.get("completion") is not None:
    prompt, completion = row["prompt"], row["completion"]
    if _is_conversation(prompt):
      return _example("conversational", _messages(prompt, "prompt"),
                      [_reply(completion, "completion")], [CHOSEN_RATING])
    return _example("plain", _text(prompt, "prompt"), [_text(completion, "completion")],
                    [CHOSEN_RATING])
  raise RowError("<row>", f"none of TRL's standard formats: expected prompt/chosen/rejected, "
                          f"chosen/rejected, messages or prompt/completion; has {sorted(row)}")


# --- files and datasets ---------------------------------------------------------------------

def _jsonl_rows(path: str):
  for n, value in jsonl.parsed_lines(path):
    if isinstance(value, json.JSONDecodeError):
      value = RowError("<line>", f"not valid JSON ({value})")
    yield f"{path}:{n}", value


def _dataset_rows(spec: str, split: str, builder: str | None = None):
  """Rows through `datasets`: a file with a packaged builder (parquet, json), else a hub id or
  dataset directory."""
  import datasets  # the ecosystem's reader; only where a parquet file or hub id is read
  try:
    if builder:
      ds = datasets.load_dataset(builder, data_files={split: spec}, split=split)
    else:
      ds = datasets.load_dataset(spec, split=split)
  except Exception as e:  # noqa: BLE001 - hub, network and format failures: one clear message
    raise ValueError(f"data.dataset={spec!r} (split {split!r}): datasets.load_dataset failed: "
                     f"{type(e).__name__}: {e}") from e
  for i, row in enumerate(ds):
    yield f"{spec}: row {i}", row


def rows(spec: str, split: str, *, train_split: str = "train"):
  """(where, row or RowError) of every row of the `split` of `spec` (module doc)."""
  spec = os.path.expanduser(spec)
  if "{split}" in spec:
    spec = spec.replace("{split}", split)
  elif split != train_split and os.path.isfile(spec):
    raise FileNotFoundError(
        f"data.dataset={spec!r} is one file, the {train_split!r} split; there is no {split!r} "
        "split: put {split} in the path (e.g. prefs_{split}.jsonl), or set train.eval_every=0")
  name = spec[:-3] if spec.endswith(".gz") else spec
  kind = next((k for k in (".jsonl", ".json", ".parquet") if name.endswith(k)), None)
  if kind and not os.path.isfile(spec):
    raise FileNotFoundError(f"data.dataset: no such file {spec!r}")
  if kind == ".jsonl":
    return _jsonl_rows(spec)
  if kind:  # .json: an array of rows, or JSON lines, as datasets' json builder reads both
    return _dataset_rows(spec, split, kind[1:])
  return _dataset_rows(spec, split)


class StandardSource:
  """The examples of a dataset in TRL's standard formats: random access, picklable.

  `form`: plain | conversational; `skipped`: the malformed rows' messages; `rows`: rows read;
  `system_folded`: rows whose system messages went into the first user turn."""

  def __init__(self, examples: list[dict], form: str, skipped: list[str], rows: int,
               system_folded: int):
    self.examples, self.form, self.skipped = examples, form, skipped
    self.rows, self.system_folded = rows, system_folded

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    return self.examples[i]


def open_standard(spec: str, split: str, *, train_split: str = "train",
                  bad_rows: str = "skip") -> StandardSource:
  """The `split` of `spec` as alignment examples (module doc)."""
  if bad_rows not in BAD_ROWS:
    raise ValueError(f"data.bad_rows={bad_rows!r}: expected one of {BAD_ROWS}")
  examples, skipped, form, n, folded = [], [], None, 0, 0
  for where, row in rows(spec, split, train_split=train_split):
    n += 1
    try:
      if isinstance(row, RowError):
        raise row
      ex, row_form, was_folded = row_to_example(row)
      if form is not None and row_form != form:
        field = next((k for k in ("prompt", "chosen", "messages") if k in row), "<row>")
        raise RowError(field, f"a {row_form} row in a {form} dataset (its first good row); "
                              "one dataset holds one form")
    except RowError as e:
      msg = f"{where}: {e}"
      if bad_rows == "raise":
        raise ValueError(msg) from None
      if len(skipped) < _LOGGED:
        logging.warning("data: skipping malformed row: %s", msg)
      skipped.append(msg)
      continue
    form = row_form
    folded += was_folded
    examples.append(ex)
  if not examples:
    first = f"; first: {skipped[0]}" if skipped else ""
    raise ValueError(f"data.dataset={spec!r} (split {split!r}): no usable row in {n}{first}")
  if skipped:
    logging.warning("data: %s (split %s): skipped %d malformed of %d rows (first: %s)", spec,
                    split, len(skipped), n, skipped[0])
  if folded:
    logging.warning("data: %s: %d rows have system messages, folded into the first user turn "
                    "(the alignment contract's turns have no system role)", spec, folded)
  return StandardSource(examples, form, skipped, n, folded)
