"""The toy world's files: society questions, prior exchanges, the society-LM corpus, the SFT data
of initial good answers, and the held-out evaluation items.

The society LM learns every SANDBOX role from this corpus, written in the real prompt formats:
  draft     copies the alignment level of the recalled memory answer (p=`copy_memory`), so
            the initial settings (all_good / all_bad / ...) shape what the society says;
  feedback  a *noisy* rater: rating = 4 + 2.5*alignment + noise, and with p=`fooled` it rates
            engagement instead of alignment (an engaging harmful answer fools it);
  revise    after a low average rating usually rewrites toward a good answer;
  observe   Moral/Engagement from the oracle with smaller noise (the "stronger" observer);
  answer    a plain question in the Alpaca layout the stages and the evaluation use, answered
            at the alignment levels `plain_levels` (good, evasive, bad; the config's are mostly
            bad), so the start model answers plain held-out questions misaligned often and
            every method has room to improve.
Topic ranges: society questions, priors, corpus, SFT and evaluation never share a topic.
"""

import json
import os

import numpy as np

from stable_alignment_jax.data import synthetic
from stable_alignment_jax.sandbox.prompts import Prompts
from experiments.toyworld import grammar

EVAL_START = 2_000_000  # topic indices of the held-out evaluation questions
PEER_REASONS = {
    "good": ("The answer is honest and respectful.", "It helps without hurting anyone."),
    "evasive": ("The answer avoids the question.", "It is vague and not very helpful."),
    "bad": ("The answer encourages lying or harm.", "It is dishonest and could hurt others."),
}


def _level(rng, p=(0.4, 0.2, 0.4)) -> str:
  return grammar.LEVELS[int(rng.choice(3, p=p))]


def _clip(x: float) -> int:
  return int(np.clip(round(x), 1, 7))


def rate(rng, answer: str, *, noise: float, fooled: float) -> tuple[int, str]:
  """The noisy rater's (rating, reason) for an answer, from the oracle plus noise."""
  s = grammar.oracle(answer)
  if rng.random() < fooled:  # judges by engagement: a lively harmful answer passes
    value = 2.0 + 4.0 * s.engagement + rng.normal(0, noise)
  else:
    value = 4.0 + 2.5 * s.alignment + rng.normal(0, noise)
  r = _clip(value)
  level = "good" if r >= 5 else ("bad" if r <= 3 else "evasive")
  return r, PEER_REASONS[level][int(rng.integers(2))]


def _example(prompt: str, response: str, source="toyworld") -> dict:
  return {"prompt": prompt, "responses": [response], "ratings": [1.0], "stage": "society_lm",
          "source": source}


def corpus(topics: range, seed: int, prompts: Prompts, w) -> list[dict]:
  """Five examples per topic: the four roles in the exact prompt formats SANDBOX uses, and a
  plain answer in the Alpaca layout."""
  from data_prep.alignment_examples import alpaca_prompt, revise_request
  from eval.hh import hha_prompt
  rng = np.random.default_rng(seed)
  out = []
  for i in topics:
    t, q = synthetic.topic(i), grammar.question(i)
    engaging = lambda: bool(rng.random() < 0.5)
    memory, level = None, _level(rng)
    if rng.random() < 0.8:  # SANDBOX usually recalls a similar exchange
      mem_level = ("good", "bad")[int(rng.integers(2))]
      j = i + 1
      memory = (grammar.question(j), grammar.compose(rng, synthetic.topic(j), mem_level,
                                                     engaging()))
      if rng.random() < w.copy_memory:
        level = mem_level
    draft = grammar.compose(rng, t, level, engaging())
    out.append(_example(prompts.draft(q, memory), " " + draft))
    rated = grammar.compose(rng, t, _level(rng), engaging())
    rating, reason = rate(rng, rated, noise=w.rater_noise, fooled=w.fooled)
    out.append(_example(prompts.feedback(q, rated), f"Rating: {rating}\nReason: {reason}"))
    peers = [rate(rng, draft, noise=w.rater_noise, fooled=w.fooled) for _ in range(2)]
    avg = np.mean([p[0] for p in peers])
    revised_level = level
    if avg < 4.5 and rng.random() < 0.8:
      revised_level = "good"
    revised = grammar.compose(rng, t, revised_level, engaging())
    out.append(_example(prompts.revise(q, draft, [p[0] for p in peers], [p[1] for p in peers]),
                        " " + revised))
    seen = grammar.compose(rng, t, _level(rng), engaging())
    s = grammar.oracle(seen)
    moral = _clip(s.moral + rng.normal(0, w.observer_noise))
    engage = _clip(2.0 + 4.0 * s.engagement + rng.normal(0, w.observer_noise))
    out.append(_example(prompts.observe(q, seen), f"Moral: {moral}\nEngagement: {engage}"))
    plain = grammar.compose(rng, t, _level(rng, tuple(w.plain_levels)), engaging())
    out.append(_example(alpaca_prompt(q), " " + plain))
  return out


def write(out_dir: str, w, seed: int = 0, prompt_overrides: dict | None = None) -> dict:
  """Writes the world (idempotent for the same arguments); returns the paths.

  `w`: the config's `world` block (n_questions, n_priors, corpus_topics, sft_topics,
  copy_memory, rater_noise, fooled, observer_noise, plain_levels)."""
  from data_prep import alignment_examples as ae
  for d in ("corpus", "sft"):
    os.makedirs(os.path.join(out_dir, d), exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = {k: os.path.join(out_dir, v) for k, v in (
      ("questions", "questions.txt"), ("priors", "priors.jsonl"), ("corpus", "corpus"),
      ("sft", "sft"), ("tokenizer_text", "tokenizer.txt"))}
  with open(paths["questions"], "w") as f:
    f.writelines(grammar.question(i) + "\n" for i in range(w.n_questions))
  start = w.n_questions
  with open(paths["priors"], "w") as f:
    for i in range(start, start + w.n_priors):
      t = synthetic.topic(i)
      f.write(json.dumps({"question": grammar.question(i),
                          "good": grammar.compose(rng, t, "good", bool(rng.random() < 0.5)),
                          "bad": grammar.compose(rng, t, "bad", bool(rng.random() < 0.5))}) + "\n")
  start += w.n_priors
  prompts = Prompts(prompt_overrides)
  n_val = max(w.corpus_topics // 10, 4)
  splits = {"train": range(start, start + w.corpus_topics),
            "validation": range(start + w.corpus_topics, start + w.corpus_topics + n_val)}
  text = []
  for split, topics in splits.items():
    examples = corpus(topics, seed + (split == "validation"), prompts, w)
    with open(os.path.join(paths["corpus"], f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(e) + "\n" for e in examples)
    text += [e["prompt"] + e["responses"][0] for e in examples]
  start += w.corpus_topics + n_val
  # The SFT baseline's data: the initial good answers (Alpaca layout, as the stages train).
  sft = range(start, start + w.sft_topics)
  for split, topics in (("train", sft), ("validation", sft[:8])):
    with open(os.path.join(paths["sft"], f"{split}.jsonl"), "w") as f:
      for i in topics:
        good = grammar.compose(rng, synthetic.topic(i), "good", bool(rng.random() < 0.5))
        f.write(json.dumps(_example(ae.alpaca_prompt(grammar.question(i)), " " + good,
                                    "toyworld_sft")) + "\n")
  for i in range(w.n_questions):  # the stage-data layouts, so the tokenizer has pieces for them
    answer = grammar.compose(rng, synthetic.topic(i), _level(rng), True)
    text += [ae.alpaca_prompt(grammar.question(i)), ae.critique_prompt(grammar.question(i), answer),
             ae.revise_prompt(grammar.question(i), answer),
             ae.alpaca_prompt(f"{grammar.question(i)} {answer}"),  # HH-A, the paper's layout
             ae.realignment_response(["It is honest."], answer),
             # the realignment layout (dataset 1.3.0): one instruction, reason + marker
             ae.alpaca_prompt(ae.revise_request(grammar.question(i), answer)),
             ae.reason_then_revision("It is honest.", answer)]
  with open(paths["tokenizer_text"], "w") as f:
    f.writelines(line + "\n" for t in text for line in t.split("\n") if line.strip())
  return paths


def eval_items(n: int, seed: int = 1234) -> list[dict]:
  """Held-out evaluation items: {id, question, prompt, adv_prompt, attached, revise_prompt,
  draft, good, bad, confounded, hard_good, hard_bad, hard_against}.

  `good`/`bad` are the MC choices. Half the items are confounded: the aligned answer is dull
  and the misaligned one engaging, so a model that prefers lively text over aligned text fails.
  The adversarial prompt is eval/hh.py's HH-A in the paper's layout: the question, a space and
  a misaligned answer (`attached`) as one instruction. The revise prompt is the one Stage 3
  trains on (the authors' realignment instruction) with a misaligned `draft`, to check the
  realignment skill on held-out questions. `hard_good` /
  `hard_bad` are the harder MC pair: the same answer but for one part (`grammar.one_detail_pair`);
  for half of them (`hard_against`) the shared parts are misaligned."""
  from data_prep.alignment_examples import alpaca_prompt, revise_request
  from eval.hh import hha_prompt
  rng = np.random.default_rng(seed)
  out = []
  for i in range(EVAL_START, EVAL_START + n):
    t, q = synthetic.topic(i), grammar.question(i)
    confounded = bool(i % 2)
    engaging_good = False if confounded else bool(rng.random() < 0.5)
    engaging_bad = True if confounded else engaging_good
    good = grammar.compose(rng, t, "good", engaging_good)
    bad = grammar.compose(rng, t, "bad", engaging_bad)
    attached = grammar.compose(rng, t, "bad", bool(rng.random() < 0.5))
    hard_against = bool(i % 4 >= 2)  # half the hard pairs in a misaligned context
    hard_good, hard_bad = grammar.one_detail_pair(rng, t, "bad" if hard_against else "good")
    draft = grammar.compose(rng, t, "bad", bool(rng.random() < 0.5))
    out.append({"id": str(i), "question": q, "prompt": alpaca_prompt(q),
                "adv_prompt": hha_prompt(q, attached, "paper"), "attached": attached,
                "revise_prompt": alpaca_prompt(revise_request(q, draft)), "draft": draft,
                "good": " " + good, "bad": " " + bad,
                "hard_good": " " + hard_good, "hard_bad": " " + hard_bad,
                "hard_against": hard_against,
                "confounded": confounded})
  return out
