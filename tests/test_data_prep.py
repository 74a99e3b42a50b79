"""data_prep: SANDBOX exports -> the three alignment datasets, HH-RLHF, tokenizer training.

Expected examples are written out by hand here (prompt text included), not produced by the code
under test; datasets are read back through tfds.data_source + grain without TensorFlow.
"""

import collections
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep import alignment_examples as ax
from data_prep import build as build_lib
from data_prep import export as export_lib
from data_prep import hh_rlhf
from data_prep import tfds_writer
from data_prep import tokenizer as tok_train
from stable_alignment_jax.data import loader as data
from stable_alignment_jax.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = load_tokenizer("byte")
KINDS = ("imitation", "self_critic", "realignment")

# The Alpaca layouts, typed out independently of data_prep.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n")


def rec(question, draft, revised, feedback=(), *, run_id="run1", agent=0, rnd=0, model="m"):
  """A record of the export contract; `draft`/`revised` = (text, moral), feedback = (peer,
  rating, reason) triples."""
  return {"run_id": run_id, "round": rnd, "agent": agent, "agent_model": model,
          "question": question,
          "draft": {"text": draft[0], "moral": draft[1], "engagement": 5.0},
          "feedback": [{"peer": p, "rating": r, "reason": why} for p, r, why in feedback],
          "revised": {"text": revised[0], "moral": revised[1], "engagement": None}}


def write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def critique(q, d):
  return ALPACA_INPUT.format(ax.CRITIQUE_INSTRUCTION, f"Question: {q}\nAnswer: {d}")


def revise(q, d):
  return ALPACA_INPUT.format(ax.REVISE_INSTRUCTION, f"Question: {q}\nAnswer: {d}")


def simple(examples):
  return [(e["prompt"], list(e["responses"]), [float(r) for r in e["ratings"]])
          for e in examples]


# --- the three kinds, by hand ----------------------------------------------------------------

def test_imitation_groups_answers_by_question_with_moral_ratings():
  records = [rec("Q1", ("a", 3.0), ("b", 5.0), run_id="r1", model="m1"),
             rec("Q1", ("c", None), ("b", 6.0), agent=1, run_id="r2", model="m1"),
             rec("Q2", ("d", 2.0), ("e", None))]
  drops = collections.Counter()
  got = ax.imitation_examples(records, drops)
  # "b" given twice under Q1 is one response with the mean rating (5 + 6) / 2.
  assert simple(got) == [(ALPACA.format("Q1"), ["a", "b"], [3.0, 5.5]),
                         (ALPACA.format("Q2"), ["d"], [2.0])]
  assert got[0]["stage"] == "imitation" and got[0]["source"] == "r1/m1,r2/m1"
  assert +drops == {"imitation: draft moral score is null": 1,
                    "imitation: revised moral score is null": 1,
                    "imitation: repeated answer merged": 1}


def test_self_critic_rates_peer_reasons_and_skips_null_ratings():
  records = [rec("Q", ("draft one", 3.0), ("x", 4.0), [(1, 5, "kind enough"), (2, None, "??"),
                                                       (3, 2, "rude")]),
             rec("Q", ("draft two", 3.0), ("y", 4.0), [(4, None, "a"), (5, None, "b")]),
             rec("Q", ("draft one", 1.0), ("z", 2.0), [(6, 7, "great")], agent=3)]
  drops = collections.Counter()
  got = ax.self_critic_examples(records, drops)
  # each reason behind the critique prefix, typed out here
  assert simple(got) == [(critique("Q", "draft one"),
                          ["Critique: kind enough", "Critique: rude", "Critique: great"],
                          [5.0, 2.0, 7.0])]
  assert +drops == {"self_critic: peer rating is null": 3,
                    "self_critic: record without a rated peer reason": 1}


@pytest.mark.parametrize("before,after,kept,reason", [
    (3.0, 5.0, True, None),
    (3.0, 4.5, True, None),
    (5.0, 5.0, False, "realignment: revision not scored higher than draft"),    # equal scores
    (6.0, 5.0, False, "realignment: revision not scored higher than draft"),
    (2.0, 4.0, False, "realignment: revision not scored above 4"),              # 4 is not above 4
    (4.0, 4.0, False, "realignment: revision not scored higher than draft"),
    (None, 6.0, False, "realignment: draft or revision moral score is null"),
    (3.0, None, False, "realignment: draft or revision moral score is null"),
])
def test_realignment_filter_edge_cases(before, after, kept, reason):
  r = rec("Q?", ("bad draft", before), ("better", after), [(1, 2, "be kinder"), (2, None, "no")])
  drops = collections.Counter()
  got = ax.realignment_examples([r], drops)
  if kept:
    # The authors' form: one instruction (question, draft, request), one response per rated
    # reason; peer 2's reason has no rating, so it is left out and counted.
    prompt = ALPACA.format("Q? bad draft " + ax.REVISE_REQUEST)
    assert simple(got) == [(prompt, ["be kinder Here is the revised response: better"],
                            [after])]
    assert +drops == {"realignment: peer rating is null": 1}
    drops.clear()
    bulleted = ax.realignment_examples([r], drops, "bulleted")
    want = "Feedback:\n- be kinder\n\nHere is the revised response:\nbetter"
    assert simple(bulleted) == [(revise("Q?", "bad draft"), [want], [after])]
  else:
    assert got == [] and +drops == {reason: 1}


def test_realignment_needs_rated_feedback_to_restate():
  drops = collections.Counter()
  assert ax.realignment_examples([rec("Q", ("d", 2.0), ("r", 6.0), [])], drops) == []
  assert ax.realignment_examples([rec("Q", ("d", 2.0), ("r", 6.0), [(1, None, "x"),
                                                                     (2, 5, " ")])], drops) == []
  assert +drops == {"realignment: no rated feedback to restate": 2,
                    "realignment: peer rating is null": 1, "realignment: peer reason is empty": 1}
  with pytest.raises(ValueError, match="realignment form 'x'"):
    ax.realignment_examples([], drops, "x")


def test_realignment_from_a_hand_made_export_one_response_per_rated_reason(tmp_path):
  # Two agents revised the same draft of the same question (one group), a third another draft.
  recs = [rec("Can I lie?", ("Yes, lie freely.", 2.0), ("Be honest instead.", 6.0),
              [(1, 2, "It encourages deceit."), (2, 3, "It is harmful."), (3, None, "meh")],
              agent=0),
          rec("Can I lie?", ("Yes, lie freely.", 2.0), ("Honesty is better; tell the truth.", 7.0),
              [(0, 1, "It encourages deceit."), (4, 2, "")], agent=1),
          rec("Can I lie?", ("Sure.", 3.0), ("No, lying hurts trust.", 5.0),
              [(0, 2, "Too short and wrong.")], agent=2)]
  path = tmp_path / "export.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  records, rejections, _ = export_lib.read_exports([str(path)])
  assert not rejections
  exs, drops = ax.build_examples(records)
  got = {e["prompt"]: dict(zip(e["responses"], e["ratings"])) for e in exs["realignment"]}
  marker = " Here is the revised response: "
  p1 = ALPACA.format("Can I lie? Yes, lie freely. " + ax.REVISE_REQUEST)
  p2 = ALPACA.format("Can I lie? Sure. " + ax.REVISE_REQUEST)
  assert got == {
      p1: {"It encourages deceit." + marker + "Be honest instead.": 6.0,
           "It is harmful." + marker + "Be honest instead.": 6.0,
           "It encourages deceit." + marker + "Honesty is better; tell the truth.": 7.0},
      p2: {"Too short and wrong." + marker + "No, lying hurts trust.": 5.0}}
  assert drops["realignment: peer rating is null"] == 1
  assert drops["realignment: peer reason is empty"] == 1
  # Every response holds the marker once and the whole revision after it.
  for e in exs["realignment"]:
    assert e["turns"] == [e["prompt"].split("### Instruction:\n")[1].split("\n\n###")[0]]
    for r in e["responses"]:
      assert r.count(ax.REVISED_MARKER) == 1
      assert r.split(marker)[1] in {x["revised"]["text"] for x in recs}


def test_ratio_sampling_keeps_proportions_deterministically():
  exs = {k: [{"prompt": f"{k} {i}"} for i in range(n)]
         for k, n in zip(KINDS, (50, 30, 10))}
  drops = collections.Counter()
  out = ax.apply_ratio(exs, ax.parse_ratio("5:1:1"), 0, drops)
  assert [len(out[k]) for k in KINDS] == [50, 10, 10]
  assert drops == {"self_critic: left out by the sampling ratio": 20}
  # Kept examples are a subset in their original order; the seed picks which.
  got = [e["prompt"] for e in out["self_critic"]]
  assert got == [e["prompt"] for e in exs["self_critic"] if e["prompt"] in set(got)]
  again = ax.apply_ratio(exs, ax.parse_ratio("5:1:1"), 0, collections.Counter())
  other = ax.apply_ratio(exs, ax.parse_ratio("5:1:1"), 1, collections.Counter())
  assert again["self_critic"] == out["self_critic"] != other["self_critic"]
  out = ax.apply_ratio(exs, ax.parse_ratio("2:2:0"), 0, collections.Counter())
  assert [len(out[k]) for k in KINDS] == [30, 30, 0]
  for bad in ("5:1", "a:b:c", "0:0:0", "-1:1:1"):
    with pytest.raises(ValueError, match="ratio"):
      ax.parse_ratio(bad)


# --- bad input -----------------------------------------------------------------------------

def _good(q="Is lying ok?", agent=0):
  return rec(q, ("Sometimes.", 3.0), ("No, be honest.", 6.0),
             [(agent + 1, 6, "honest is better")], agent=agent)  # a peer is another agent


def test_bad_lines_are_named_and_the_rest_is_read(tmp_path):
  missing = _good()
  del missing["question"]
  wrong = _good()
  wrong["round"] = "1"
  empty = _good()
  empty["draft"]["text"] = "   "
  out_of_range = _good()
  out_of_range["feedback"][0]["rating"] = 9
  float_rating = _good()
  float_rating["feedback"][0]["rating"] = 5.5
  path = write_jsonl(tmp_path / "e.jsonl", [
      _good("q1"), "{not json", missing, wrong, "", empty, out_of_range, float_rating, "[1, 2]",
      _good("q2")])
  with open(path, "ab") as f:
    f.write(b'{"run_id": "\xff"}\n')
  records, rejections, lines = export_lib.read_exports([path])
  assert [r["question"] for r in records] == ["q1", "q2"] and lines == {path: 11}
  got = [(r.line, r.category, r.reason) for r in rejections]
  assert [g[:2] for g in got] == [
      (2, "malformed JSON"), (3, "missing field"), (4, "wrong type"), (6, "empty text"),
      (7, "out of range"), (8, "wrong type"), (9, "wrong type"), (11, "not UTF-8")]
  reasons = [g[2] for g in got]
  assert "question" in reasons[1] and "round" in reasons[2] and "draft.text" in reasons[3]
  assert "feedback[0].rating" in reasons[4] and "feedback[0].rating" in reasons[5]
  assert str(rejections[0]).startswith(f"{path}:2: malformed JSON")


def test_build_keeps_good_records_and_summarises_rejections(tmp_path):
  path = write_jsonl(tmp_path / "e.jsonl", [_good("q1"), "{oops", _good("q2"), {"run_id": 3}])
  card = build_lib.build([path], str(tmp_path / "out"))
  assert card["records"] == 2 and card["rejected"]["count"] == 2
  assert card["rejected"]["by_reason"] == {"malformed JSON": 1, "wrong type": 1}
  assert card["rejected"]["first"][0].startswith(f"{path}:2: malformed JSON")
  n = sum(len(data.open_tfds("sandbox_alignment/imitation", str(tmp_path / "out"), s))
          for s in ("train", "validation"))
  assert n == 2
  text = build_lib.summary(card)
  assert "rejected 2 line(s)" in text and f"{path}:4: field run_id: expected a string" in text


# --- a built dataset -----------------------------------------------------------------------

def _society(n_questions=40, seed=0):
  """Records with known structure: every question answered by 3 agents, some scores null."""
  rng = np.random.default_rng(seed)
  out = []
  for q in range(n_questions):
    for a in range(3):
      before = None if (q + a) % 7 == 0 else float(rng.integers(1, 8))
      after = float(rng.integers(1, 8))
      fb = [(a + 1, int(rng.integers(1, 8)), f"reason {q}.{a}.1"),
            (a + 2, None if q % 5 == 0 else int(rng.integers(1, 8)), f"reason {q}.{a}.2")]
      out.append(rec(f"question number {q}?", (f"draft {q}.{a}", before),
                     (f"revision {q}.{a}", after), fb, agent=a, rnd=q))
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = tmp_path_factory.mktemp("built")
  records = _society()
  half = len(records) // 2
  paths = [write_jsonl(d / "a.jsonl", records[:half]), write_jsonl(d / "b.jsonl", records[half:])]
  card = build_lib.build(paths, str(d / "out"), validation_percent=30)
  return {"dir": str(d / "out"), "records": records, "card": card, "paths": paths}


def _read(out_dir, kind, split):
  return list(data.open_tfds(f"sandbox_alignment/{kind}", out_dir, split))


def _question(prompt):
  m = re.search(r"### Instruction:\n(.*?)\n\n### Response", prompt, re.S)
  if m and m.group(1).endswith(ax.REVISE_REQUEST):  # realignment: "question draft request"
    return re.match(r"(question number \d+\?)", m.group(1)).group(1)
  if m and "### Input" not in prompt:
    return m.group(1)
  return re.search(r"Question: (.*)\nAnswer:", prompt).group(1)


def test_round_trip_equals_what_was_built(built):
  want, _ = ax.build_examples(built["records"])
  for kind in KINDS:
    got = _read(built["dir"], kind, "train") + _read(built["dir"], kind, "validation")
    assert sorted(simple(got)) == sorted(simple(want[kind])) and len(got) > 5
    assert all(ex["stage"] == kind and ex["source"] == "run1/m" for ex in got)
    assert all(ex["ratings"].dtype == np.float32 for ex in got)
  assert "tensorflow" not in sys.modules  # read without TensorFlow


def test_no_question_crosses_splits(built):
  seen = {}
  for kind in KINDS:
    for split in ("train", "validation"):
      for ex in _read(built["dir"], kind, split):
        assert seen.setdefault(_question(ex["prompt"]), split) == split
  n_val = sum(s == "validation" for s in seen.values())
  assert len(seen) == 40 and 3 <= n_val <= 22  # ~30% of 40 questions


def test_card_counts(built):
  card, records = built["card"], built["records"]
  assert card["records"] == len(records) == 120 and card["rejected"]["count"] == 0
  assert card["inputs"] == {built["paths"][0]: 60, built["paths"][1]: 60}
  # Null counts worked out from the records independently.
  null_drafts = sum(r["draft"]["moral"] is None for r in records)
  null_peers = sum(fb["rating"] is None for r in records for fb in r["feedback"])
  assert card["dropped"]["imitation: draft moral score is null"] == null_drafts > 0
  assert card["dropped"]["self_critic: peer rating is null"] == null_peers > 0
  kept = [r for r in records if r["draft"]["moral"] is not None
          and r["revised"]["moral"] > max(r["draft"]["moral"], 4.0)
          and any(fb["rating"] is not None and fb["reason"].strip() for fb in r["feedback"])]
  # One example per (question, draft), one response per rated reason (merged when repeated).
  assert card["datasets"]["realignment"]["examples"] == len(
      {(r["question"], r["draft"]["text"]) for r in kept})
  assert card["dropped"]["realignment: draft or revision moral score is null"] == null_drafts
  for kind in KINDS:
    # K, the responses an example holds, per kind over both splits: mean and distribution.
    ks = [len(e["responses"]) for split in ("train", "validation")
          for e in _read(built["dir"], kind, split)]
    k_card = card["datasets"][kind]["responses_per_example"]
    assert k_card["distribution"] == {str(k): v for k, v in sorted(collections.Counter(ks).items())}
    assert k_card["mean"] == round(sum(ks) / len(ks), 3) and k_card["max"] == max(ks)
    for split, c in card["datasets"][kind]["splits"].items():
      exs = _read(built["dir"], kind, split)
      assert c["examples"] == len(exs)
      per_prompt = collections.Counter(len(e["responses"]) for e in exs)
      assert c["responses_per_prompt"] == {str(k): v for k, v in sorted(per_prompt.items())}
      ratings = collections.Counter(int(np.floor(r + 0.5)) for e in exs for r in e["ratings"])
      assert c["ratings"] == {str(k): v for k, v in sorted(ratings.items())}
  with open(build_lib.card_path(built["dir"])) as f:
    assert json.load(f) == json.loads(json.dumps(card))


def test_grain_batches_decode_to_prompt_and_responses(built):
  src = data.open_tfds("sandbox_alignment/self_critic", built["dir"], "train")
  loader = data.make_loader(src, BYTE, global_batch_size=2, max_len=512, num_responses=2,
                            seed=0, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  assert loader.stats["dropped"] == {}
  batches = list(loader)
  assert len(batches) == len(src) // 2
  for b_i, batch in enumerate(batches):
    for row in range(2):
      ex = src[2 * b_i + row]
      for k in range(2):
        tokens, mask = batch["tokens"][row, k], batch["loss_mask"][row, k].astype(bool)
        if k >= len(ex["responses"]):
          assert batch["response_mask"][row, k] == 0 and not mask.any()
          continue
        start = int(np.argmax(mask))
        assert BYTE.decode(tokens[1:start]) == ex["prompt"]
        assert BYTE.decode(tokens[mask][:-1]) == ex["responses"][k]
        assert batch["ratings"][row, k] == ex["ratings"][k]


def test_tfds_source_resume_and_two_processes(built):
  src = data.open_tfds("sandbox_alignment/imitation", built["dir"], "train")
  kw = dict(global_batch_size=4, max_len=256, num_responses=3, seed=3)
  it = iter(data.make_loader(src, BYTE, shard_index=0, shard_count=1, **kw))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = iter(data.make_loader(src, BYTE, shard_index=0, shard_count=1, **kw))
  fresh.set_state(state)
  for a, b in zip(want, [next(fresh) for _ in range(3)]):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  # Two processes: disjoint halves of one epoch.
  halves = []
  for shard in (0, 1):
    loader = data.make_loader(src, BYTE, shard_index=shard, shard_count=2, num_epochs=1,
                              drop_remainder=False, **kw)
    halves.append([BYTE.decode(b["tokens"][i, 0][b["loss_mask"][i, 0] == 0])
                   for b in loader for i in range(b["tokens"].shape[0])])
  a, b = set(halves[0]), set(halves[1])
  assert len(a) == len(halves[0]) == len(b) == len(src) // 2 and not a & b
  assert a | b <= {ex["prompt"] for ex in src}


def test_records_match_tfds_own_encoder(built):
  """Our fast proto writer produces what tfds's own example encoder/serializer would."""
  from tensorflow_datasets.core import example_serializer
  from tensorflow_datasets.proto import tf_example_pb2
  feats = tfds_writer.features()
  ser = example_serializer.ExampleSerializer(feats.get_serialized_info())
  exs = _read(built["dir"], "imitation", "train") + [
      {"prompt": "é 你好\n", "responses": [], "ratings": [], "stage": "s", "source": "",
       "turns": ["é 你好"]}]
  for ex in exs:
    ours = tfds_writer.encode_record(ex)
    theirs = ser.serialize_example(feats.encode_example(ex))
    assert tf_example_pb2.Example.FromString(ours) == tf_example_pb2.Example.FromString(theirs)
    back = feats.deserialize_example_np(ours)
    assert back["prompt"].decode() == ex["prompt"]
    assert [r.decode() for r in back["responses"]] == list(ex["responses"])
    assert [t.decode() for t in back["turns"]] == list(ex["turns"])
  with pytest.raises(ValueError, match="2 responses, 1 ratings"):
    tfds_writer.encode_record({"prompt": "p", "responses": ["a", "b"], "ratings": [1.0],
                               "stage": "s", "source": "x", "turns": ["p"]})


def test_rebuild_is_safe_and_failures_lose_nothing(tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  first = write_jsonl(tmp_path / "a.jsonl", [_good(f"q{i}", agent=i) for i in range(6)])
  build_lib.build([first], out)
  before = _read(out, "imitation", "train")
  assert len(before) > 0
  # A failing run (missing file, bad ratio, a crash while writing) leaves the old data intact.
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    build_lib.build([first, str(tmp_path / "nope.jsonl")], out)
  with pytest.raises(ValueError, match="ratio"):
    build_lib.build([first], out, ratio="1:2")
  second = write_jsonl(tmp_path / "b.jsonl", [_good("other", agent=1)])
  calls = {"n": 0}
  real = tfds_writer.encode_record

  def crash(ex):
    calls["n"] += 1
    if calls["n"] == 1:
      raise KeyboardInterrupt("killed while writing")
    return real(ex)
  monkeypatch.setattr(tfds_writer, "encode_record", crash)
  with pytest.raises(KeyboardInterrupt):
    build_lib.build([second], out, validation_percent=0)
  monkeypatch.undo()
  assert simple(_read(out, "imitation", "train")) == simple(before)
  assert not [n for n in os.listdir(out) if n.startswith(".incomplete")]
  # A successful re-run replaces the dataset.
  build_lib.build([second], out, validation_percent=0)
  assert [e["prompt"] for e in _read(out, "imitation", "train")] == [ALPACA.format("other")]


def test_command_line(tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", [_good(f"q{i}", agent=i) for i in range(5)])
  b = write_jsonl(tmp_path / "b.jsonl", [_good(f"p{i}", agent=i) for i in range(5)] + ["{x"])
  out = str(tmp_path / "out")
  cmd = [sys.executable, "-m", "data_prep.build", f"--export={a},{b}", f"--out={out}",
         "--ratio=5:1:1", "--seed=2", "--validation_percent=20"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  card = json.loads(res.stdout)
  assert card["records"] == 10 and card["ratio"] == "5:1:1" and card["seed"] == 2
  assert f"{b}:6: malformed JSON" in res.stderr
  with open(build_lib.card_path(out)) as f:
    assert json.load(f) == card
  res = subprocess.run(cmd[:4] + [f"--out={out}", "--ratio=5:1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and "ratio" in res.stderr


# --- HH-RLHF -------------------------------------------------------------------------------

def _dialogue(*turns):
  return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


@pytest.mark.parametrize("prompt,turns", [
    ("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", ["a", "b", "c"]),
    ("Human: one line\nand another\n\nAssistant:", ["one line\nand another"]),
    ("Human: a\n\nHuman: b\n\nAssistant:", []),  # two Human turns in a row: no chat form
    ("Human: a\n\nAssistant: b\n\nAssistant:", []),  # ends on the assistant
    ("Assistant: hi\n\nHuman: a\n\nAssistant:", []),  # starts with the assistant
])
def test_hh_dialogue_turns(prompt, turns):
  assert hh_rlhf.dialogue_turns(prompt) == turns


def test_hh_rlhf_pairs_by_hand(tmp_path):
  d = tmp_path / "hh"
  (d / "helpful-base").mkdir(parents=True)
  lines = [
      {"chosen": _dialogue("hi", "hello", "how to bake?", "Use an oven."),
       "rejected": _dialogue("hi", "hello", "how to bake?", "No idea.")},
      {"chosen": _dialogue("a", "b"), "rejected": _dialogue("a different", "b")},  # prefix differs
      {"chosen": _dialogue("a", ""), "rejected": _dialogue("a", "x")},             # empty chosen
      {"chosen": _dialogue("a", "same"), "rejected": _dialogue("a", "same")},      # identical
      "{broken",
      {"chosen": _dialogue("a", "b")},                                              # missing field
      {"chosen": "\n\nHuman: no reply here", "rejected": _dialogue("a", "b")},       # no Assistant
  ]
  with gzip.open(d / "helpful-base" / "train.jsonl.gz", "wt", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  write_jsonl(d / "harmless-base_test.jsonl", [lines[0]])  # the flat layout, not gzipped
  out = str(tmp_path / "out")
  card = hh_rlhf.build(str(d), out)
  want = ("Human: hi\n\nAssistant: hello\n\nHuman: how to bake?\n\nAssistant:",
          ["Use an oven.", "No idea."], [1.0, 0.0])
  got = data.open_tfds("hh_rlhf/helpful_base", out, "train")
  assert simple(list(got)) == [want]
  assert got[0]["source"] == "hh-rlhf/helpful_base"
  assert got[0]["turns"] == ["hi", "hello", "how to bake?"]  # the chat form of the prompt
  assert simple(list(data.open_tfds("hh_rlhf/all", out, "test"))) == [want]
  f = card["files"][str(d / "helpful-base" / "train.jsonl.gz")]
  assert f["lines"] == 7 and f["examples"] == 1 and f["rejected"] == 3
  assert f["dropped"] == {"chosen and rejected differ before the last Assistant turn": 1,
                          "empty chosen reply": 1, "chosen and rejected replies are identical": 1}
  assert card["rejected"]["by_reason"] == {"malformed JSON": 1, "missing field": 1,
                                           "no Assistant turn": 1}
  assert any(r.endswith("train.jsonl.gz:6: missing field rejected")
             for r in card["rejected"]["first"])


def test_hh_rlhf_real_files(shared_data, tmp_path):
  src = shared_data / "hh_rlhf"
  if not src.is_dir():
    pytest.skip(f"HH-RLHF files not found at {src}")
  card = hh_rlhf.build(str(src), str(tmp_path))
  assert len(card["files"]) == 2
  total = 0
  for path, f in card["files"].items():
    with gzip.open(path, "rt", encoding="utf-8") as fh:
      rows = [json.loads(line) for line in fh]
    assert f["lines"] == len(rows) == f["examples"] + f["rejected"] + sum(f["dropped"].values())
    assert f["examples"] > 0.98 * len(rows)
    got = data.open_tfds(f"hh_rlhf/{f['subset']}", str(tmp_path), f["split"])
    assert len(got) == f["examples"]
    # The first example rebuilds its line's dialogues exactly (when it was kept).
    first = got[0]
    assert "\n\n" + first["prompt"] + " " + first["responses"][0] == rows[0]["chosen"]
    assert "\n\n" + first["prompt"] + " " + first["responses"][1] == rows[0]["rejected"]
    total += f["examples"]
  assert len(data.open_tfds("hh_rlhf/all", str(tmp_path), "test")) == total


# --- tokenizer -----------------------------------------------------------------------------

def test_train_sentencepiece_on_dataset_text(built, tmp_path):
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 8)))
           for _ in range(300)]
  text = write_jsonl(tmp_path / "t.jsonl",
                     [{"text": " ".join(rng.choice(words, size=12))} for _ in range(300)])
  prefix = str(tmp_path / "tok" / "sp")
  res = subprocess.run([sys.executable, "-m", "data_prep.tokenizer",
                        f"--input={built['dir']},{text}", f"--out={prefix}",
                        "--vocab_size=400"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  tok = load_tokenizer(prefix + ".model")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 1, 2, 3)
  src = data.open_tfds("sandbox_alignment/realignment", built["dir"], "train")
  n_ids = n_bytes = 0
  for ex in src:
    for s in [ex["prompt"]] + ex["responses"] + ["tabs\tand  spaces\n\n, é 你好 42"]:
      ids = tok.encode(s)
      assert tok.decode(ids) == s and 0 not in ids  # exact, never <unk> (byte fallback)
      n_ids, n_bytes = n_ids + len(ids), n_bytes + len(s.encode("utf-8"))
  assert n_ids < 0.6 * n_bytes, (n_ids, n_bytes)  # it learned merges: far fewer ids than bytes
  loader = data.make_loader(src, tok, global_batch_size=2, max_len=512, num_responses=1, seed=0,
                            num_epochs=1, shard_index=0, shard_count=1)
  assert int(next(iter(loader))["tokens"].max()) < 400
  with pytest.raises(ValueError, match="vocab_size=5000"):
    tok_train.train([text], str(tmp_path / "big"), vocab_size=5000)


def test_split_rule_is_stable_and_ignores_kind():
  # The split is a function of the question alone: the same for every kind and every run.
  qs = [f"q{i}" for i in range(2000)]
  val = [q for q in qs if ax.split_of(q, 10) == "validation"]
  assert 140 <= len(val) <= 260
  assert val == [q for q in qs if ax.split_of(" " + q + "\n", 10) == "validation"]
  assert all(ax.split_of(q, 0) == "train" for q in qs)
  h = int(hashlib.sha256(b"q0").hexdigest()[:8], 16) % 10000
  assert ax.split_of("q0", h / 100 + 0.01) == "validation" != ax.split_of("q0", h / 100)


def test_hand_built_records_meet_the_sandbox_export_contract():
  # The records these tests build are ones the sandbox's own exporter would accept, so what is
  # shown here holds for real exports.
  from stable_alignment_jax.sandbox import export as sandbox_export
  for i, r in enumerate(_society() + [_good()]):
    sandbox_export.validate_record(r, f"record {i}")
    assert export_lib.parse_record(json.loads(json.dumps(r)))["question"] == r["question"]
