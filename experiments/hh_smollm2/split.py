"""HH-RLHF dialogues -> train / held-out by a hash of the first question, and what max_len cuts.

The dialogues are Anthropic's published HH-RLHF *test* files (harmless-base, helpful-base): the
only human preference data on this machine, so they are reused as a training source here and
split again, by question, into our own train and held-out parts. Many dialogues share their
opening question (HH-RLHF collected several conversations per question); splitting by a hash
of that question, not by line, keeps every copy of a question on one side, so no held-out
question was trained on.
"""

import collections
import hashlib
import json
import os
import re

from data_prep import hh_rlhf

_HUMAN = re.compile(r"^\s*Human:\s*(.*?)(?:\n\nAssistant:|\Z)", re.S)


def first_question(ex: dict) -> str:
  """The dialogue's first human turn, whitespace-normalised and lower-cased (the split key)."""
  q = ex["turns"][0] if ex["turns"] else ""
  if not q:  # a dialogue whose speakers do not alternate: its first Human turn from the text
    m = _HUMAN.match(ex["prompt"])
    q = m.group(1) if m else ex["prompt"]
  return " ".join(q.split()).lower()


def bucket(question: str) -> float:
  """A question's place in [0, 1): the first 8 bytes of its SHA-256, fixed across runs and
  machines (Python's hash() is salted per process)."""
  h = hashlib.sha256(question.encode("utf-8")).digest()
  return int.from_bytes(h[:8], "big") / 2.0 ** 64


def read_pairs(hh_dir: str) -> tuple[list[dict], dict]:
  """Every HH-RLHF file under `hh_dir` (data_prep.hh_rlhf reads and checks them) -> examples in
  file order, each with `question` and `source`; and the per-file line accounting."""
  files = hh_rlhf.find_files(hh_dir)
  if not files:
    raise FileNotFoundError(f"{hh_dir}: no HH-RLHF files (<subset>_<split>.jsonl.gz)")
  out, card = [], {}
  for (subset, split), path in files.items():
    exs, rejections, drops, lines = hh_rlhf.read_file(path, f"hh-rlhf/{subset}/{split}")
    if rejections:
      first = rejections[0]
      raise ValueError(f"{len(rejections)} malformed line(s) in {path}, first: {first}")
    for ex in exs:
      ex["question"] = first_question(ex)
    out += exs
    card[os.path.basename(path)] = {"lines": lines, "pairs": len(exs), "dropped": dict(drops)}
  return out, card


def split_pairs(pairs: list[dict], held_out: float) -> tuple[list[dict], list[dict]]:
  """(train, held-out): a pair is held out when its first question's bucket is < held_out."""
  train, test = [], []
  for ex in pairs:
    (test if bucket(ex["question"]) < held_out else train).append(ex)
  return train, test


def token_counts(examples: list[dict], fmt, max_len: int) -> dict:
  """What `data.encode_example` (BOS + prompt + reply + end of turn, cut at max_len) leaves out
  of `examples` under prompt format `fmt`: counted here from the same token ids, because the
  loader reports only the examples it drops."""
  c = collections.Counter(examples=len(examples))
  kept_tokens = total_tokens = 0
  for ex in examples:
    prompt = fmt.prompt_ids(ex)
    if prompt is None:
      c["dropped_no_chat_turns"] += 1
      continue
    if len(prompt) + 1 > max_len:
      c["dropped_prompt_too_long"] += 1
      continue
    c["kept"] += 1
    room = max_len - len(prompt)
    for name, reply in zip(("chosen", "rejected"), ex["responses"]):
      n = len(fmt.response_ids(reply))
      total_tokens += n
      kept_tokens += min(n, room)
      if n > room:
        c[f"{name}_truncated"] += 1
  out = dict(c)
  out["reply_tokens_kept_share"] = kept_tokens / total_tokens if total_tokens else None
  return out


def fits(ex: dict, fmt, max_len: int) -> bool:
  """Whether the prompt and both whole replies fit max_len (the held-out pairs we score)."""
  prompt = fmt.prompt_ids(ex)
  return prompt is not None and all(
      len(prompt) + len(fmt.response_ids(r)) <= max_len for r in ex["responses"])


def write_jsonl(path: str, examples: list[dict]) -> None:
  """The alignment-dataset contract that `data.source = jsonl` reads ({split}.jsonl)."""
  keys = ("prompt", "responses", "ratings", "turns", "stage", "source")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps({k: ex[k] for k in keys}, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
