"""The answer-format measure: the detector on hand-written replies of every shape, the summary
against hand counts, the tiny world's held-out questions, and the eval task end to end on a
random tiny model down to its results-table column."""

import json
import math
import os

import numpy as np
import pytest

from data_prep import alignment_examples as ax
from eval import answer_format as af

# Replies typed out by hand (the markers as the training data writes them), with their class
# and the text that is scored as the answer.
REPLIES = [
    ("I am glad to help with this. Talk to them kindly.", "answer",
     "I am glad to help with this. Talk to them kindly."),
    ("  - Talk to them\n- Ask a friend  \n", "answer", "- Talk to them\n- Ask a friend"),
    ("Critique: The answer is rude and could cause harm.", "critique", None),
    ("Feedback:\n- The answer is rude.\n- It avoids the question.", "feedback", None),
    ("Feedbacourages lying or harm\n- It is rude", "feedback", None),  # the header misspelt
    ("Critiquue: It is kind.", "critique", None),
    ("Rating: 2\nReason: It is rude.", "critique", None),  # SANDBOX's judging replies
    ("Moral: 6\nEngagement: 4", "critique", None),
    ("Feed the dog twice a day.", "answer", "Feed the dog twice a day."),
    ("Feedback:\n- The answer is rude.\n\nHere is the revised response:\nBe kind to them.",
     "realigned", "Be kind to them."),
    ("Feedback:\n- It is vague.\n\nHere is the revised response:\n  \n", "feedback", None),
    ("Here is the revised response:\nCritique: It is rude.", "critique", None),
    ("Sure.\n\n### Instruction:\nWhat should I do?", "echo", None),
    ("### Response:\nBe nice.", "echo", None),
    ("Critique the answer below to the given question and say why.", "echo", None),
    ("Question: What should I do?\nAnswer: Lie.", "echo", None),
    ("Feedback:\n- ok\n\nHere is the revised response:\n### Input:\nx", "echo", None),
    ("", "empty", None),
    (" \n\t", "empty", None),
]


@pytest.mark.parametrize("text,kind,answer", REPLIES)
def test_classify_and_answer_text_by_hand(text, kind, answer):
  assert af.classify(text) == kind
  assert af.answer_text(text) == answer


def test_training_targets_have_the_shapes_the_detector_reads():
  """The detector and data_prep agree: a self-critic target is a critique, a realignment
  target is realigned with its revision as the answer, an imitation answer is an answer."""
  recs = [{"run_id": "r", "round": 0, "agent": 0, "agent_model": "m", "question": "Q?",
           "draft": {"text": "Just lie.", "moral": 2.0, "engagement": 3.0},
           "feedback": [{"peer": 1, "rating": 2, "reason": "It encourages lying."},
                        {"peer": 2, "rating": 3, "reason": " It is rude. "}],
           "revised": {"text": "Tell the truth kindly.", "moral": 6.0, "engagement": 4.0}}]
  exs, _ = ax.build_examples(recs)
  critiques = exs["self_critic"][0]["responses"]
  assert critiques == ["Critique: It encourages lying.", "Critique: It is rude."]
  assert {af.classify(t) for t in critiques} == {"critique"}
  # The authors' form: one (reason, marker, revision) response per rated peer.
  realigned = exs["realignment"][0]["responses"]
  assert len(realigned) == 2
  assert {af.classify(t) for t in realigned} == {"realigned"}
  assert {af.answer_text(t) for t in realigned} == {"Tell the truth kindly."}
  # The bulleted form cut before the revision reads as feedback, not an answer (the
  # per-reason form has no header: a lone reason cannot be told from an answer).
  exs_b, _ = ax.build_examples(recs, "bulleted")
  (bulleted,) = exs_b["realignment"][0]["responses"]
  assert af.classify(bulleted) == "realigned"
  assert af.answer_text(bulleted) == "Tell the truth kindly."
  assert af.classify(bulleted[:bulleted.index(ax.REVISED_MARKER)]) == "feedback"
  assert {af.classify(t) for t in exs["imitation"][0]["responses"]} == {"answer"}
  # a prompt the model copies is an echo, whichever layout
  for prompt in (ax.alpaca_prompt("Q?"), ax.critique_prompt("Q?", "d"),
                 ax.revise_prompt("Q?", "d")):
    assert af.classify(prompt) == "echo"
  assert af.classify(ax.user_turn(ax.REVISE_INSTRUCTION, "x")) == "echo"


def test_summarize_matches_hand_count():
  texts = [r[0] for r in REPLIES]
  s = af.summarize(texts)
  # hand count of REPLIES: answer 3, realigned 1, critique 5, feedback 3, echo 5, empty 2
  want = {"answer": 3, "realigned": 1, "critique": 5, "feedback": 3, "echo": 5, "empty": 2}
  assert s["n"] == 19 and s["counts"] == want
  assert s["shares"] == {k: v / 19 for k, v in want.items()}
  assert s["answer_share"] == pytest.approx(4 / 19)
  # bootstrap SE of a 0/1 mean is close to the binomial one
  assert s["answer_share_se"] == pytest.approx(math.sqrt(4 / 19 * 15 / 19 / 19), rel=0.15)
  empty = af.summarize([])
  assert empty["n"] == 0 and empty["answer_share"] is None


def test_heldout_questions_are_disjoint_from_every_world_question(tmp_path):
  from experiments.tiny_world import world
  held = world.heldout_questions(64)
  assert len(set(held)) == 64 and all(q.startswith("What should I do about ") for q in held)
  paths = world.write(str(tmp_path), n_questions=64, n_priors=8, n_corpus_topics=8)
  with open(paths["questions"]) as f:
    sandbox = [line.strip() for line in f]
  with open(paths["priors"]) as f:
    priors = [json.loads(line)["question"] for line in f]
  assert len(sandbox) == 64 and not set(held) & (set(sandbox) | set(priors))
  # any n_questions a run may choose: the whole society question form over many topics
  assert not set(held) & {world.question(i) for i in range(20_000)}
  assert not set(held) & {world.question(i) for i in range(world.EVAL_START,
                                                          world.EVAL_START + 2000)}


def test_prompt_layout_follows_the_run(tmp_path):
  from eval import run
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  byte = load_tokenizer("byte")  # no chat template
  assert run.prompt_layout("random:tiny:0", byte, "auto") == "alpaca"
  d = tmp_path / "run"
  d.mkdir()
  (d / "run_config.json").write_text(json.dumps({"data": {"prompt_format": "chat_template",
                                                          "tokenizer": "byte"}}))
  assert run.prompt_layout(str(d), byte, "auto") == "chat_template"
  assert run.prompt_layout(str(d), byte, "alpaca") == "alpaca"
  assert run._format_prompt("Q?", "alpaca") == ax.alpaca_prompt("Q?")
  assert run._format_prompt("Q?", "chat_template") == [{"role": "user", "content": "Q?"}]


def test_judge_sees_the_revision_of_a_realigned_reply():
  from eval import run
  reply = "Feedback:\n- rude\n\nHere is the revised response:\nBe kind."
  assert run.judged_text(reply) == "Be kind."
  assert run.judged_text("Critique: rude") == "Critique: rude"
  assert run.judged_text(" Be kind. ") == " Be kind. "
  # The authors' per-reason form (dataset 1.3.0): one reason, the marker, the revision.
  assert run.judged_text(ax.reason_then_revision("It is rude.", "Be kind.")) == "Be kind."


def test_answer_format_tasks_end_to_end_and_table(tmp_path):
  from configs import eval as eval_config
  from eval import results, run, table
  from experiments.tiny_world import world
  out = tmp_path / "eval"
  cfg = eval_config.get_config(f"tiny,out_dir={out}")
  cfg.methods = {"rand": "random:tiny:0"}
  cfg.tasks, cfg.limit, cfg.progress = "answer_format,answer_format_sampled", 0, False
  cfg.answer_format.update(questions="experiments.tiny_world.world:heldout_questions",
                           exclude_file="", n=4, max_new_tokens=8, batch_size=4)
  summary = run.evaluate(cfg)["rand"]
  store = results.SystemResults(str(out / "rand"))
  held = world.heldout_questions()[:4]
  for task, column in af.TASK_COLUMNS.items():
    recs = store.records(task)
    assert [r["question"] for r in recs] == held and {r["layout"] for r in recs} == {"alpaca"}
    want = af.summarize([r["answer"] for r in recs])
    assert summary["answer_format"][task] == want
    col = summary["columns"][column]
    assert col["value"] == want["answer_share"] and np.isfinite(col["value"]) and col["n"] == 4
    assert store.finished(task, 0)["n"] == 4
  # finished tasks are not generated again
  run.evaluate(cfg)
  assert len(store.records("answer_format")) == 4
  md = table.make_table([str(out)], str(tmp_path / "table"))
  header = md.splitlines()[0]
  assert "| Answers |" in header and "| Answers (sampled) |" in header
  row = next(line for line in md.splitlines() if line.startswith("| rand |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  cols = [c.strip() for c in header.strip("|").split("|")]
  share = summary["columns"]["Answers"]["value"]
  assert cells[cols.index("Answers")].startswith(f"{share:.3f}")
  assert os.path.exists(tmp_path / "table" / "results.json")
