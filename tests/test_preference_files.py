"""data.source = "trl": TRL's standard dataset formats (preference_files.py) into [B, K, T].

Hand-made JSONL and parquet files, plain and conversational, each with malformed rows that are
named (file, row, field), skipped and counted while the rest load. The implicit-prompt split is
checked against TRL's own `extract_prompt`, the conversational prompt against TRL's
`apply_chat_template` on a ChatML tokenizer, and the batches against the bytes of the rows.
"""

import json
import logging

import ml_collections
import numpy as np
import pytest

from stable_alignment_jax.data import loader as data, preference_files as pf
from stable_alignment_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")

PLAIN = [
    {"prompt": "Is lying ok?", "chosen": " Rarely.", "rejected": " Always."},
    {"prompt": "Greet me.", "chosen": " Hello!", "rejected": " Go away."},
    {"prompt": "Count to two.", "chosen": " One, two.", "rejected": " Three."},
]
SYS = {"role": "system", "content": "Be kind."}
U = lambda t: {"role": "user", "content": t}
A = lambda t: {"role": "assistant", "content": t}
CONV = [
    {"prompt": [U("Is lying ok?")], "chosen": [A("Rarely.")], "rejected": [A("Always.")]},
    {"prompt": [SYS, U("Hi"), A("Hello."), U("Help me?")], "chosen": [A("Sure.")],
     "rejected": [A("No.")]},
    # implicit prompt: whole conversations sharing the prompt messages
    {"chosen": [U("Greet me."), A("Hello!")], "rejected": [U("Greet me."), A("Go away.")]},
]


def write_jsonl(path, rows, extra_lines=()):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return str(path)


def write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


# --- plain and conversational rows, JSONL and parquet ----------------------------------------

def test_plain_jsonl_with_malformed_rows_named_and_skipped(tmp_path, caplog):
  bad = [{"prompt": "Q?", "chosen": "yes"},  # line 4: no rejected
         {"prompt": 3, "chosen": "a", "rejected": "b"}]  # line 5: prompt not a string
  path = write_jsonl(tmp_path / "p.jsonl", PLAIN + bad, ['{"prompt": "cut', '["a list"]'])
  with caplog.at_level(logging.WARNING):
    src = pf.open_standard(path, "train")
  assert src.form == "plain" and len(src) == 3 and src.rows == 7
  assert [src[i] for i in range(3)] == [
      {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "ratings": [1.0, 0.0]}
      for r in PLAIN]
  assert src.skipped[0] == f"{path}:4: field 'rejected': missing"
  assert src.skipped[1] == f"{path}:5: field 'prompt': expected a string, got int"
  assert src.skipped[2].startswith(f"{path}:6: field '<line>': not valid JSON")
  assert src.skipped[3] == f"{path}:7: field '<row>': expected a JSON object, got list"
  assert f"skipped 4 malformed of 7 rows" in caplog.text
  with pytest.raises(ValueError, match=rf"{path}:4: field 'rejected': missing"):
    pf.open_standard(path, "train", bad_rows="raise")


def test_conversational_jsonl(tmp_path, caplog):
  bad = [{"prompt": [U("a"), U("b")], "chosen": [A("x")], "rejected": [A("y")]},  # line 4
         {"prompt": [U("a")], "chosen": [A("x"), U("more")], "rejected": [A("y")]},  # line 5
         PLAIN[0]]  # line 6: a plain row in a conversational file
  path = write_jsonl(tmp_path / "c.jsonl", CONV + bad)
  with caplog.at_level(logging.WARNING):
    src = pf.open_standard(path, "train")
  assert src.form == "conversational" and len(src) == 3 and src.system_folded == 1
  assert src[0]["turns"] == ["Is lying ok?"] and src[0]["responses"] == ["Rarely.", "Always."]
  assert src[1]["turns"] == ["Be kind.\n\nHi", "Hello.", "Help me?"]
  assert src[2]["turns"] == ["Greet me."] and src[2]["responses"] == ["Hello!", "Go away."]
  assert all(ex["ratings"] == [1.0, 0.0] for ex in src.examples)
  # the Alpaca-layout prompt a tokenizer without a template trains on (data_prep's layout)
  from data_prep import alignment_examples as ax
  assert src[0]["prompt"] == ax.alpaca_prompt("Is lying ok?")
  assert "### Instruction:\nHelp me?" in src[1]["prompt"] and "Be kind." in src[1]["prompt"]
  assert src.skipped[0].startswith(f"{path}:4: field 'prompt': the prompt messages must "
                                   "alternate")
  assert src.skipped[1] == (f"{path}:5: field 'chosen': expected one assistant message, got "
                            "roles ['assistant', 'user']")
  assert src.skipped[2] == (f"{path}:6: field 'prompt': a plain row in a conversational dataset "
                            "(its first good row); one dataset holds one form")
  assert "folded into the first user turn" in caplog.text


@pytest.mark.parametrize("form", ["plain", "conversational"])
def test_parquet_with_a_malformed_row(tmp_path, form):
  rows = [dict(r) for r in (PLAIN if form == "plain" else CONV[:2])]
  if form == "plain":
    rows.insert(1, {"prompt": "Q?", "chosen": None, "rejected": "b"})
  else:
    rows.insert(1, {"prompt": [A("out of turn")], "chosen": [A("x")], "rejected": [A("y")]})
  path = write_parquet(tmp_path / f"{form}.parquet", rows)
  src = pf.open_standard(path, "train")
  good = [r for i, r in enumerate(rows) if i != 1]
  assert src.form == form and len(src) == len(good) and src.rows == len(rows)
  assert [ex["responses"] for ex in src.examples] == [
      [r["chosen"], r["rejected"]] if form == "plain"
      else [r["chosen"][0]["content"], r["rejected"][0]["content"]] for r in good]
  want = ("field 'chosen': missing" if form == "plain" else
          "field 'prompt': the prompt messages must alternate")
  assert len(src.skipped) == 1 and src.skipped[0].startswith(f"{path}: row 1: {want}")


def test_sft_formats_messages_and_prompt_completion(tmp_path):
  msgs = [{"messages": [SYS, U("Hi"), A("Hello."), U("Bye?"), A("Bye!")]},
          {"messages": [U("Only a question")]}]  # row 2: no reply
  src = pf.open_standard(write_jsonl(tmp_path / "m.jsonl", msgs), "train")
  assert src.examples[0]["turns"] == ["Be kind.\n\nHi", "Hello.", "Bye?"]
  assert src.examples[0]["responses"] == ["Bye!"] and src.examples[0]["ratings"] == [1.0]
  assert src.skipped == [f"{tmp_path}/m.jsonl:2: field 'messages': expected the prompt "
                         "messages, then the assistant reply last"]
  pc = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "x", "text": "only text"}]
  src = pf.open_standard(write_parquet(tmp_path / "pc.parquet", pc), "train")
  assert src.examples == [{"prompt": "2+2=", "responses": [" 4"], "ratings": [1.0]}]
  assert "none of TRL's standard formats" in src.skipped[0] and "row 1" in src.skipped[0]


def test_implicit_prompt_split_is_trls():
  from trl.data_utils import extract_prompt
  rows = [{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello friend",
           "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away"},
          {"chosen": "Q: color? A: blue sky", "rejected": "Q: color? A: green"},
          CONV[2]]
  for row in rows:
    ex, _, _ = pf.row_to_example(row)
    want = extract_prompt(row)
    reply = lambda x: x if isinstance(x, str) else x[0]["content"]
    assert ex["responses"] == [reply(want["chosen"]), reply(want["rejected"])]
    if isinstance(row["chosen"], str):
      assert ex["prompt"] == want["prompt"]
    else:
      assert ex["turns"] == [m["content"] for m in want["prompt"]]


def test_dataset_directory_like_a_hub_id_and_split_naming(tmp_path):
  """A directory (or hub id) goes through `datasets.load_dataset(spec, split=...)`; `{split}` in a
  file name picks the split's file; one file has no eval split."""
  d = tmp_path / "ds"
  d.mkdir()
  write_parquet(d / "train.parquet", PLAIN)
  write_parquet(d / "test.parquet", PLAIN[:1])
  assert len(pf.open_standard(str(d), "train")) == 3
  assert len(pf.open_standard(str(d), "test")) == 1
  write_jsonl(tmp_path / "prefs_train.jsonl", PLAIN)
  write_jsonl(tmp_path / "prefs_validation.jsonl", PLAIN[1:])
  spec = str(tmp_path / "prefs_{split}.jsonl")
  assert len(pf.open_standard(spec, "validation")) == 2
  (tmp_path / "array.json").write_text(json.dumps(PLAIN))  # a JSON array, not lines
  assert [ex["responses"][0] for ex in pf.open_standard(str(tmp_path / "array.json"),
                                                       "train").examples] == [
      r["chosen"] for r in PLAIN]
  one = write_jsonl(tmp_path / "one.jsonl", PLAIN)
  with pytest.raises(FileNotFoundError, match="is one file, the 'train' split; there is no "
                                              "'validation' split"):
    pf.open_standard(one, "validation")
  with pytest.raises(ValueError, match="no usable row in 1; first: .*field 'rejected'"):
    pf.open_standard(write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "x"}]), "train")
  with pytest.raises(ValueError, match=r"data.dataset='.*ds' \(split 'validation'\): "
                                       "datasets.load_dataset failed"):
    pf.open_standard(str(d), "validation")  # the directory has train and test only
  with pytest.raises(ValueError, match="data.bad_rows='ignore'"):
    pf.open_standard(one, "train", bad_rows="ignore")


# --- into the [B, K, T] contract ------------------------------------------------------------

def _dc(path, **kw):
  return ml_collections.ConfigDict(dict(
      source="trl", dataset=path, bad_rows="skip", train_split="train", chain_of_hindsight=False,
      data_dir="", mixture={}, num_responses=2, **kw))


def _loader(src, tok=BYTE, prompt_format="auto", max_len=48, **kw):
  return data.make_loader(src, tok, global_batch_size=2, max_len=max_len, num_responses=2, seed=3,
                          shard_index=0, shard_count=1, prompt_format=prompt_format, **kw)


def test_plain_rows_become_k2_batches_chosen_above_rejected(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", PLAIN, ['{"prompt": "x"}'])
  src = data.open_source(_dc(path), "train", seed=0)
  loader = _loader(src, shuffle=False)
  assert loader.stats["kept"] == 3 and loader.stats["prompt_format"] == "alpaca"
  batch = next(iter(loader))
  assert batch["tokens"].shape == (2, 2, 48)
  np.testing.assert_array_equal(batch["ratings"], [[1.0, 0.0]] * 2)
  np.testing.assert_array_equal(batch["response_mask"], 1.0)
  for i, row in enumerate(PLAIN[:2]):
    for k, key in enumerate(("chosen", "rejected")):
      toks, mask = batch["tokens"][i, k], batch["loss_mask"][i, k]
      prompt = [BYTE.bos_id] + BYTE.encode(row["prompt"])
      resp = BYTE.encode(row[key]) + [BYTE.eos_id]
      assert list(toks[:len(prompt) + len(resp)]) == prompt + resp
      assert list(np.flatnonzero(mask)) == list(range(len(prompt), len(prompt) + len(resp)))


def test_conversational_rows_in_the_chat_template_match_trl(tmp_path):
  from test_prompt_format import _chatml_dir
  from trl.data_utils import apply_chat_template
  import transformers
  tok_dir = _chatml_dir(tmp_path / "chatml")
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  path = write_jsonl(tmp_path / "c.jsonl", CONV)
  src = data.open_source(_dc(path), "train", seed=0)
  loader = _loader(src, load_tokenizer(tok_dir), shuffle=False, num_epochs=1,
                   drop_remainder=False, max_len=400)
  assert loader.stats["prompt_format"] == "chat_template" and loader.stats["kept"] == 3
  batches = list(iter(loader))
  tokens = np.concatenate([b["tokens"] for b in batches])
  masks = np.concatenate([b["loss_mask"] for b in batches])
  for i, row in enumerate(CONV):
    row = dict(row)
    if "prompt" not in row:
      from trl.data_utils import extract_prompt
      row = extract_prompt(row)
    row["prompt"] = [U("Be kind.\n\nHi")] + row["prompt"][2:] if row["prompt"][0] == SYS else row[
        "prompt"]  # our turns fold the system message into the first user turn
    want = apply_chat_template(row, hf)
    for k, key in enumerate(("chosen", "rejected")):
      n_prompt = int(np.flatnonzero(masks[i, k])[0])
      assert hf.decode(tokens[i, k, :n_prompt]) == want["prompt"]
      resp = hf.decode(tokens[i, k, masks[i, k] > 0])
      assert resp == row[key][0]["content"] + "<|im_end|>"
      assert want[key].startswith(resp)  # TRL keeps the template's newline after it as well


def test_exact_resume_and_a_mixture_entry(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", PLAIN * 3)
  loader = _loader(data.open_source(_dc(path), "train", seed=0))
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  it2 = iter(loader)
  it2.set_state(json.loads(json.dumps(state)))
  for a, b in zip(want, (next(it2) for _ in range(4))):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # a stage can read a TRL-format file as one entry of its mixture
  dc = _dc("", synthetic_examples=16)
  dc.source = "synthetic"
  dc.dataset = ""
  dc.mixture = {"prefs": {"source": "trl", "dataset": path, "weight": 1.0}}
  mix = data.open_mixture(dc, "train", seed=0)
  assert [kind for kind, _, _ in mix.entries] == ["prefs"]
  assert isinstance(mix.entries[0][1], pf.StandardSource) and len(mix.entries[0][1]) == 9


def test_a_pipeline_baseline_keeps_the_trl_dataset_its_config_names(tmp_path):
  from configs import pipeline as pipeline_config
  from stable_alignment_jax.recipes import pipeline
  c = pipeline_config.get_config("tiny")
  c.out_dir = str(tmp_path / "run")
  c.baselines.sft.data.source, c.baselines.sft.data.dataset = "trl", "org/prefs"
  card = {"datasets": {"imitation": {"splits": {"train": {"examples": 5},
                                                "validation": {"examples": 2}}}}}
  p = pipeline.Pipeline(c)
  s = p._stage_cfg(c.baselines.sft, "imitation", card, "start", "sft", "")
  assert (s.data.source, s.data.dataset) == ("trl", "org/prefs")
  m = p._stage_cfg(c.baselines.mixed, "imitation", card, "start", "mixed", "")
  assert (m.data.source, m.data.dataset) == ("tfds", "sandbox_alignment/imitation")
