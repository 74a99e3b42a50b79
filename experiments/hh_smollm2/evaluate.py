"""One system's raw measurements: held-out pair log-likelihoods, benchmark credits, answers.

Everything the report computes (accuracies, implicit rewards against the start, statistics) is
derived from what this returns, so the numbers can be recomputed without a model.

Benchmarks are fixed subsets, the same items for every system (`benchmark_items`):
- Moral Stories (eval.moral_stories, "choose": the moral vs the immoral action, decided by the
  per-token mean log-likelihood as eval.metrics does for it);
- ETHICS (eval.ethics, test split): an equal share of items from each of its five subsets,
  decided per item by the summed log-likelihood (accuracy, not the grouped exact match);
- TruthfulQA MC1 (eval.truthfulqa): zero-shot, "Q: ...\\nA:" without eval's six-shot QA
  primer. The primer is ~250 tokens before every question; on this machine's budget it would
  cost more than the other benchmarks together. Numbers are therefore not comparable to
  6-shot MC1 scores.
"""

import numpy as np

from data_prep.alignment_examples import alpaca_prompt, user_turn
from eval import answer_format, ethics, metrics, moral_stories, truthfulqa
from experiments.hh_smollm2 import scoring

BENCHMARKS = ("moral_stories", "ethics", "truthfulqa_mc1")
PRIMARY = {"moral_stories": "mean", "ethics": "sum", "truthfulqa_mc1": "sum"}


def _sample(items: list, n: int, seed: int) -> list:
  if n >= len(items):
    return list(items)
  pick = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
  return [items[i] for i in sorted(pick)]


def benchmark_items(data_dir: str, n: int, seed: int) -> dict[str, list]:
  """{task: [MCItem]}: n items of each benchmark, drawn once with `seed`."""
  out = {"moral_stories": _sample(moral_stories.load(data_dir, "choose"), n, seed)}
  per = -(-n // len(ethics.SUBSETS))
  out["ethics"] = [it for s in ethics.SUBSETS
                   for it in _sample(ethics.load(data_dir, s, "test", seed=seed), per, seed)]
  tqa = []
  for it in truthfulqa.load_mc1(data_dir):
    head = truthfulqa.QA_PRIMER + "\n\n"
    if not it.context.startswith(head):
      raise ValueError(f"truthfulqa item {it.id}: context does not start with the QA primer")
    tqa.append(it.__class__(it.id, it.context[len(head):], it.choices, it.label, it.task))
  out["truthfulqa_mc1"] = _sample(tqa, n, seed)
  return out


def chat_prompt(question: str, layout: str):
  """The answer-format prompt in the layout training used (as eval.run builds it)."""
  if layout == "chat_template":  # rendered by the sampler with the checkpoint's template
    return [{"role": "user", "content": user_turn(question)}]
  return alpaca_prompt(question)


def evaluate(spec: str, tokenizer_path: str, pairs: list[dict] | None, bench: dict[str, list],
             questions: list[str] | None, *, prompt_format: str, max_len: int,
             batch_tokens: int, max_new_tokens: int, gen_batch: int,
             progress: bool = True) -> dict:
  """Raw measurements of the checkpoint `spec` (an HF or run directory): the held-out pairs'
  log-likelihoods (pairs), the benchmarks' credits (bench), the answers to questions; a part
  given as None or empty is left out."""
  from eval.answers import AnswerGenerator
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.data import tokenizer as tok_lib
  from stable_alignment_jax.data.prompt_format import PromptFormat
  graphdef, state = checkpoints.load_model(spec, dtype="float32")
  tok = tok_lib.load_tokenizer(tokenizer_path)
  fmt = PromptFormat(tok, prompt_format)
  kw = dict(max_len=max_len, batch_tokens=batch_tokens, progress=progress)
  out = {"spec": spec}
  if pairs:
    scorer = scoring.GroupScorer(graphdef, state, desc="held-out pairs", **kw)
    scores = scorer.score([scoring.pair_group(fmt, ex) for ex in pairs])
    out["pairs"] = {"logp": [s.tolist() for s, _ in scores],
                    "n": [n.tolist() for _, n in scores], "truncated": scorer.truncated}
  out["benchmarks"] = {}
  for task, items in bench.items():
    scorer = scoring.GroupScorer(graphdef, state, desc=task, **kw)
    scores = scorer.score([scoring.mc_group(tok, it.context, it.choices) for it in items])
    credit = []
    for it, (s, n) in zip(items, scores):
      if PRIMARY[task] == "mean":
        s = s / np.maximum(n, 1)
      credit.append(metrics.choice_credit(s, it.label))
    out["benchmarks"][task] = {"credit": credit, "truncated": scorer.truncated,
                               "ids": [it.id for it in items]}
  if questions:
    gen = AnswerGenerator(graphdef, state, tok, max_new_tokens=max_new_tokens, temperature=0.0,
                          batch_size=gen_batch, progress=progress)
    answers = gen.generate([chat_prompt(q, prompt_format) for q in questions],
                           list(range(len(questions))))
    texts = [a["answer"] for a in answers]
    out["answers"] = texts
    out["answer_format"] = answer_format.summarize(texts)
    out["answer_truncated_prompts"] = gen.truncated
  return out
