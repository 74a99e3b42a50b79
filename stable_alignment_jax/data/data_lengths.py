"""What `max_len` does to the data: which responses fit whole, what is counted, when to stop.

A row is `lead + tokens(prompt + response) + end` (prompt_format.PromptFormat.row_ids). Under
`data.truncation = "drop"` (default) a response whose row is longer than `max_len` is left out
of its example's group, so no target is ever trained without its end (EOS / end of turn); an
example with no response left is dropped ("no_response_fits"), and so is one whose prompt
leaves no room for a response token ("prompt_too_long"). Under "cut" such a response is cut to
`max_len` instead (the old behaviour): the row keeps no end it does not have, and the batch
marks it (`cut` float32[b, K] = 1).

Every loader counts, per mixture entry (kind + dataset): examples and their drops by reason,
responses, responses left out and cut, and the p50/p95/p99/max token lengths of prompts and
responses, with the `max_len` that keeps 99 % of responses whole. `check_loss` stops a run,
before its model loads, when more than 5 % of an entry's examples or responses would be lost,
unless `data.accept_length_loss` says the loss is known and accepted.
"""

import dataclasses
import json
import logging

import numpy as np

from stable_alignment_jax.data.prompt_format import PromptFormat, text

TRUNCATIONS = ("drop", "cut")
DROP_PROMPT_TOO_LONG = "prompt_too_long"
DROP_NO_RESPONSES = "no_responses"
DROP_NO_CHAT_TURNS = "no_chat_turns"
DROP_NO_RESPONSE_FITS = "no_response_fits"
LENGTH_DROPS = (DROP_PROMPT_TOO_LONG, DROP_NO_RESPONSE_FITS)  # the drops max_len causes
MAX_LOSS = 0.05  # the share of an entry's examples or responses a run may lose unasked


@dataclasses.dataclass
class Fitted:
  """One example under one max_len: `rows` are (response index, ids, prompt part, cut) of the
  responses kept; `drop` names why the example goes, None when it stays."""
  drop: str | None
  rows: list = dataclasses.field(default_factory=list)
  prompt: list = dataclasses.field(default_factory=list)  # prompt ids (lead included)
  response_lens: list = dataclasses.field(default_factory=list)  # every response, end included
  row_lens: list = dataclasses.field(default_factory=list)  # every response's whole row
  left_out: int = 0
  cut: int = 0

  @property
  def shared(self) -> int:
    """Tokens every kept row starts with (the same in all of them)."""
    return min(n for _, _, n, _ in self.rows) if self.rows else 0


def fit_example(ex: dict, fmt: PromptFormat, max_len: int, truncation: str = "drop") -> Fitted:
  if truncation not in TRUNCATIONS:
    raise ValueError(f"data.truncation={truncation!r}: expected one of {TRUNCATIONS}")
  responses = ex["responses"]
  if len(responses) == 0:
    return Fitted(DROP_NO_RESPONSES)
  lt = fmt.lead_and_text(ex)
  if lt is None:
    return Fitted(DROP_NO_CHAT_TURNS)
  lead, prompt_text = lt
  prompt = lead + fmt.tokenizer.encode(prompt_text)
  out = Fitted(None, prompt=prompt)
  rows = []
  for i, r in enumerate(responses):
    ids, n = fmt.row_ids(lead, prompt_text, prompt, r)
    out.response_lens.append(len(ids) - n)
    out.row_lens.append(len(ids))
    rows.append((i, ids, n))
  # The prompt must leave at least one position for a response token.
  if len(prompt) + 1 > max_len:
    out.drop, out.left_out = DROP_PROMPT_TOO_LONG, len(responses)
    return out
  for i, ids, n in rows:
    if len(ids) <= max_len:
      out.rows.append((i, ids, n, False))
    elif truncation == "cut" and n < max_len:
      out.rows.append((i, ids[:max_len], n, True))
      out.cut += 1
    else:
      out.left_out += 1
  if not out.rows:
    out.drop = DROP_NO_RESPONSE_FITS
  return out


def _pcts(values) -> dict:
  if not values:
    return {"p50": 0, "p95": 0, "p99": 0, "max": 0}
  v = np.asarray(values)
  return {f"p{q}": int(np.quantile(v, q / 100, method="higher")) for q in (50, 95, 99)} | {
      "max": int(v.max())}


class Counts:
  """The pre-pass tally of one mixture entry (module doc)."""

  def __init__(self):
    self.examples = self.responses = self.left_out = self.cut = 0
    self.dropped: dict[str, int] = {}
    self.prompt_lens, self.response_lens, self.row_lens = [], [], []

  def add(self, f: Fitted, n_responses: int):
    self.examples += 1
    self.responses += n_responses
    self.left_out += f.left_out
    self.cut += f.cut
    if f.drop is not None:
      self.dropped[f.drop] = self.dropped.get(f.drop, 0) + 1
    if f.prompt:
      self.prompt_lens.append(len(f.prompt))
    self.response_lens += f.response_lens
    self.row_lens += f.row_lens

  def summary(self) -> dict:
    """JSON-able counts and length percentiles (tokens; a response's length counts its end)."""
    return {"examples": self.examples, "dropped": dict(self.dropped),
            "responses": self.responses, "responses_left_out": self.left_out,
            "responses_cut": self.cut,
            "prompt_tokens": _pcts(self.prompt_lens),
            "response_tokens": _pcts(self.response_lens),
            # the max_len under which 99 % of responses fit whole, prompt and end included
            "max_len_for_99": _pcts(self.row_lens)["p99"]}


def lost(entry: dict) -> tuple[int, int]:
  """(examples, responses) an entry loses to max_len: dropped for length; left out or cut."""
  return (sum(entry["dropped"].get(r, 0) for r in LENGTH_DROPS),
          entry["responses_left_out"] + entry["responses_cut"])


def describe(entry: dict, max_len: int) -> str:
  """One line: what max_len costs an entry and the lengths that would avoid it."""
  ex_lost, resp_lost = lost(entry)
  p, r = entry["prompt_tokens"], entry["response_tokens"]
  share = lambda a, b: f"{a / b:.1%}" if b else "0%"
  kind = repr(entry["kind"]) if entry["kind"] else "(one source)"
  return (f"kind {kind} (dataset {entry.get('dataset') or 'as given'}): "
          f"{ex_lost} of {entry['examples']} examples dropped ({share(ex_lost, entry['examples'])}"
          f"; by reason {entry['dropped'] or {}}), {entry['responses_left_out']} of "
          f"{entry['responses']} responses left out and {entry['responses_cut']} cut "
          f"({share(resp_lost, entry['responses'])}) at max_len={max_len}; tokens p50/p95/p99 "
          f"prompts {p['p50']}/{p['p95']}/{p['p99']}, responses {r['p50']}/{r['p95']}/{r['p99']}"
          f"; max_len={entry['max_len_for_99']} keeps 99% of responses whole")


def over_limit(entries: list[dict], limit: float = MAX_LOSS, responses: bool = True
               ) -> list[dict]:
  out = []
  for e in entries:
    ex_lost, resp_lost = lost(e)
    if ex_lost > limit * max(e["examples"], 1) or (
        responses and resp_lost > limit * max(e["responses"], 1)):
      out.append(e)
  return out


class DataLossError(ValueError):
  """More of a kind's data would be lost to max_len than a run accepts unasked."""


def check_loss(stats: dict, max_len: int, accept: bool, *, limit: float = MAX_LOSS,
               responses: bool = True) -> None:
  """Raises DataLossError naming every entry that loses more than `limit` (module doc), unless
  `accept` (config `data.accept_length_loss`). `responses=False`: only examples count (PPO
  reads the prompts alone)."""
  bad = over_limit(stats["entries"], limit, responses)
  if bad and accept:
    logging.warning("data: data.accept_length_loss=True: training on what fits max_len=%d "
                    "although more than %.0f%% is lost for: %s", max_len, 100 * limit,
                    ", ".join(repr(e["kind"] or "(one source)") for e in bad))
  if bad and not accept:
    raise DataLossError(
        f"data: more than {limit:.0%} of a kind's data does not fit max_len={max_len}, so "
        "training would stop before the first step rather than learn from less or from cut "
        "targets:\n  " + "\n  ".join(describe(e, max_len) for e in bad)
        + "\nRaise data.max_len, or set data.accept_length_loss=True to accept the loss "
        "(data.truncation=cut trains the cut responses instead of leaving them out).")


def report(stats: dict, max_len: int) -> str:
  """The lines a trainer prints before its first step."""
  return "\n".join(f"data: {describe(e, max_len)}" for e in stats["entries"])


def write(stats: dict, path: str) -> None:
  """The loader's counts, kept in the run directory."""
  with open(path, "w") as f:
    json.dump(stats, f, indent=2, default=str)
    f.write("\n")


def check_ids(tokens: np.ndarray, vocab_size: int, ex: dict) -> None:
  """An id outside [0, vocab_size) would be wrapped silently by the embedding lookup."""
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    raise ValueError(f"example with prompt {text(ex['prompt'])[:60]!r}: token id "
                     f"{int(tokens[bad][0])} is outside the tokenizer's vocabulary "
                     f"[0, {vocab_size})")
