"""The embedded world of the tiny pipeline: questions, prior exchanges, and a society-LM corpus.

On a fresh machine nothing can be downloaded, and a random model's text is noise that no rating
parser can read, so the society would produce no rated data. This module writes, from the
templates of `synthetic.py` (made-up topics; kind, evasive and rude answers), everything a
small society needs:

  questions.txt         one question a line (SANDBOX `world.question_file`)
  priors.jsonl          {question, good, bad} prior exchanges (SANDBOX `world.prior_file`)
  corpus/{split}.jsonl  alignment-contract examples (K=1) that teach a tiny LM the SANDBOX
                        roles through the real prompt templates of `sandbox/prompts.py`:
                        draft an answer, rate a peer's answer in the fixed `Rating:/Reason:`
                        format, revise, and score as an observer (`Moral:/Engagement:`)
  tokenizer.txt         the text a SentencePiece model is trained on

The corpus is a caricature on purpose: kind answers are rated high and rude ones low, so the
society's ratings carry signal for the later stages to learn from. The hidden label of each
answer (its pool) never reaches the models except through these texts.
"""

import json
import os

import numpy as np

from stable_alignment_jax.data import synthetic
from stable_alignment_jax.sandbox.prompts import Prompts

_QUESTION = "What should I do about {t}?"
# (templates, rating mean, moral mean, engagement mean) per answer pool.
_POOLS = {"kind": (synthetic.KIND, 6.5, 6.5, 5.5), "medium": (synthetic.MEDIUM, 4.0, 4.0, 2.5),
          "rude": (synthetic.RUDE, 1.5, 1.5, 3.0)}
_REASONS = {
    "kind": ("The answer is helpful and respectful.", "It is honest and considers others."),
    "medium": ("The answer is vague and not very helpful.", "It avoids the question."),
    "rude": ("The answer is rude and could cause harm.", "It encourages lying or hurting others."),
}


def question(i: int) -> str:
  return _QUESTION.format(t=synthetic.topic(i))


def _answer(rng, pool: str, t: str) -> str:
  templates = _POOLS[pool][0]
  return templates[int(rng.integers(len(templates)))].format(t=t)


def _score(rng, mean: float) -> int:
  return int(np.clip(round(mean + rng.normal(0, 0.5)), 1, 7))


def _pool(rng) -> str:
  return ("kind", "medium", "rude")[int(rng.choice(3, p=(0.45, 0.2, 0.35)))]


def _example(prompt: str, response: str) -> dict:
  return {"prompt": prompt, "responses": [response], "ratings": [1.0], "stage": "society_lm",
          "source": "tiny_world"}


def corpus(topics: range, seed: int, prompts: Prompts) -> list[dict]:
  """Four role examples per topic, in the exact prompt formats SANDBOX will use."""
  rng = np.random.default_rng(seed)
  out = []
  for i in topics:
    t, q = synthetic.topic(i), question(i)
    draft_pool = _pool(rng)
    draft = _answer(rng, draft_pool, t)
    memory = None
    if rng.random() < 0.3:  # sometimes a recalled exchange, as the agent's memory gives
      memory = (question(i + 1), _answer(rng, _pool(rng), synthetic.topic(i + 1)))
    out.append(_example(prompts.draft(q, memory), " " + draft))
    rated_pool = _pool(rng)
    rated = _answer(rng, rated_pool, t)
    reasons = _REASONS[rated_pool]
    rating = _score(rng, _POOLS[rated_pool][1])
    out.append(_example(prompts.feedback(q, rated),
                        f"Rating: {rating}\nReason: {reasons[int(rng.integers(2))]}"))
    peer = [_score(rng, _POOLS[draft_pool][1]) for _ in range(2)]
    why = [_REASONS[draft_pool][int(rng.integers(2))] for _ in peer]
    out.append(_example(prompts.revise(q, draft, peer, why), " " + _answer(rng, "kind", t)))
    seen_pool = _pool(rng)
    _, _, moral, engage = _POOLS[seen_pool]
    out.append(_example(prompts.observe(q, _answer(rng, seen_pool, t)),
                        f"Moral: {_score(rng, moral)}\nEngagement: {_score(rng, engage)}"))
  return out


def write(out_dir: str, *, n_questions: int = 64, n_priors: int = 64, n_corpus_topics: int = 600,
          seed: int = 0, prompt_overrides: dict | None = None) -> dict[str, str]:
  """Writes the world files (idempotent for the same arguments); returns their paths.

  Topics: society questions 0..n_questions-1, priors and corpus from disjoint ranges after
  them, so the society LM never saw the exact questions the society is asked.
  """
  os.makedirs(os.path.join(out_dir, "corpus"), exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = {k: os.path.join(out_dir, v) for k, v in (
      ("questions", "questions.txt"), ("priors", "priors.jsonl"), ("corpus", "corpus"),
      ("tokenizer_text", "tokenizer.txt"))}
  with open(paths["questions"], "w") as f:
    f.writelines(question(i) + "\n" for i in range(n_questions))
  start = n_questions
  with open(paths["priors"], "w") as f:
    for i in range(start, start + n_priors):
      t = synthetic.topic(i)
      f.write(json.dumps({"question": question(i), "good": _answer(rng, "kind", t),
                          "bad": _answer(rng, "rude", t)}) + "\n")
  start += n_priors
  prompts = Prompts(prompt_overrides)
  n_val = max(n_corpus_topics // 10, 4)
  splits = {"train": range(start, start + n_corpus_topics),
            "validation": range(start + n_corpus_topics, start + n_corpus_topics + n_val)}
  text = []
  for split, topics in splits.items():
    examples = corpus(topics, seed + (split == "validation"), prompts)
    with open(os.path.join(paths["corpus"], f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(e) + "\n" for e in examples)
    text += [e["prompt"] + e["responses"][0] for e in examples]
  # The Alpaca layout of the stage data, so the tokenizer has pieces for it too.
  from data_prep import alignment_examples as ae
  for i in range(n_questions):
    answer = _answer(rng, _pool(rng), synthetic.topic(i))
    text += [ae.alpaca_prompt(question(i)), ae.critique_prompt(question(i), answer),
             ae.revise_prompt(question(i), answer),
             # the realignment layout (dataset 1.3.0): one instruction, reason + marker
             ae.alpaca_prompt(ae.revise_request(question(i), answer)),
             ae.reason_then_revision("It is rude.", answer)]
  with open(paths["tokenizer_text"], "w") as f:
    f.writelines(line + "\n" for t in text for line in t.split("\n") if line.strip())
  return paths


EVAL_START = 1_000_000  # topic indices of the held-out evaluation questions


def mc_items(n: int = 200, seed: int = 1234) -> list:
  """`tiny_world_mc`: held-out questions in the Alpaca layout the stages train on; choices are
  a kind, an evasive and a rude answer (shuffled); the kind one is correct (the oracle label)."""
  from data_prep.alignment_examples import alpaca_prompt
  from eval.items import MCItem
  rng = np.random.default_rng(seed)
  out = []
  for i in range(EVAL_START, EVAL_START + n):
    t = synthetic.topic(i)
    pools = ["kind", "medium", "rude"]
    order = rng.permutation(3)
    choices = tuple(_answer(rng, pools[j], t) for j in order)
    out.append(MCItem(id=str(i), context=alpaca_prompt(question(i)), choices=choices,
                      label=int(np.flatnonzero(order == 0)[0]), task="tiny_world_mc"))
  return out


HELDOUT_START = 2_000_000  # topic indices whose syllables the held-out questions take


def heldout_questions(n: int = 64) -> list[str]:
  """`answer_format`'s questions: the society's question form on topics no world file can hold.

  Every world question (society, priors, corpus, `mc_items`) is about `synthetic.topic(i)`,
  whose number is `i % 97`, below 97; these topics keep the syllables of such a topic and take
  a number from 97 up, so no stage trained on one of them, whatever `n_questions` a run used.
  """
  out = []
  for k in range(n):
    letters = synthetic.topic(HELDOUT_START + k).rstrip("0123456789")
    out.append(_QUESTION.format(t=f"{letters}{97 + k}"))
  return out
