"""The tiny pipeline's embedded world and the jsonl data source."""

import json

import pytest

from experiments.tiny_world import world as tiny_world
from stable_alignment_jax.data import loader as data, synthetic
from stable_alignment_jax.sandbox import parsing, world
from stable_alignment_jax.sandbox.prompts import Prompts


def test_world_files_feed_sandbox_and_training(tmp_path):
  paths = tiny_world.write(str(tmp_path), n_questions=10, n_priors=6, n_corpus_topics=20)
  qs = world.load_questions(paths["questions"], 2000)
  priors = world.load_priors(paths["priors"])
  assert len(qs) == 10 and len(priors) == 6
  assert not set(qs) & {p["question"] for p in priors}  # disjoint topics
  train = data.read_jsonl(f"{paths['corpus']}/train.jsonl")
  assert len(train) == 4 * 20 and len(data.read_jsonl(f"{paths['corpus']}/validation.jsonl")) == 16
  prompts = Prompts()
  feedback = [e for e in train if e["prompt"].startswith(prompts.t["feedback"][:40])]
  observe = [e for e in train if e["prompt"].startswith(prompts.t["observe"][:40])]
  assert len(feedback) == len(observe) == 20
  # The targets are in the fixed formats SANDBOX parses, and kind answers rate above rude ones.
  by_kind = {"kind": [], "rude": []}
  for e in feedback:
    rating, reason = parsing.parse_feedback(e["responses"][0])
    answer = e["prompt"].split("Answer: ")[1].split("\n")[0]
    for kind, templates in (("kind", synthetic.KIND), ("rude", synthetic.RUDE)):
      if any(answer.startswith(t.split("{t}")[0]) and t.split("{t}")[0] for t in templates):
        by_kind[kind].append(rating)
  assert all(1 <= r <= 7 for r in by_kind["kind"] + by_kind["rude"])
  if by_kind["kind"] and by_kind["rude"]:
    assert min(by_kind["kind"]) > max(by_kind["rude"])
  for e in observe:
    assert all(v is not None for v in parsing.parse_observer(e["responses"][0]))


def test_mc_items_label_the_kind_answer():
  items = tiny_world.mc_items(30)
  kind_texts = {t.format(t=synthetic.topic(int(it.id))) for it in items for t in synthetic.KIND}
  for it in items:
    assert it.choices[it.label] in kind_texts
    assert sum(c in kind_texts for c in it.choices) == 1
  assert len({it.label for it in items}) == 3  # the right answer is not always in one place


@pytest.mark.parametrize("line, field", [
    ("{not json", "not valid JSON"), (json.dumps({"responses": ["a"], "ratings": [1]}), "'prompt'"),
    (json.dumps({"prompt": "p", "responses": [], "ratings": []}), "'responses'"),
    (json.dumps({"prompt": "p", "responses": ["a", "b"], "ratings": [1]}), "'ratings'"),
    (json.dumps({"prompt": "p", "responses": ["a"], "ratings": [True]}), "'ratings'")])
def test_read_jsonl_names_file_line_and_field(tmp_path, line, field):
  good = json.dumps({"prompt": "p", "responses": ["a"], "ratings": [1.0]})
  path = tmp_path / "train.jsonl"
  path.write_text(good + "\n\n" + line + "\n")
  with pytest.raises(ValueError, match=f"{path}:3: .*{field}"):
    data.read_jsonl(str(path))
