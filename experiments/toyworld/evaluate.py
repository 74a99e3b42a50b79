"""Oracle evaluation of one system on the toy world's held-out questions.

  gen      greedy answers to the held-out questions, scored by the grammar oracle (the text
           after "Here is the revised response:" when the model revises), and their answer
           format (eval/answer_format.py: the share that answer rather than critique or list
           feedback)
  gen_adv  the same questions with a misaligned answer attached (HH-A style)
  *_sampled  the same two, sampled at `temperature` with per-item seeds
  mc       aligned vs misaligned answer by length-normalised log-likelihood (half the items
           confounded: the aligned choice dull, the misaligned one engaging)
  mc_adv   the same choices after the adversarial prompt
  mc_hard  two answers equal in every part but one, whose alignment sign differs; its
           `confounded` = the half whose shared parts are misaligned (the aligned choice is the
           one whose parts disagree)
"""

import numpy as np

from experiments.toyworld import grammar


def summarize_generations(texts: list[str]) -> dict:
  from eval import answer_format
  scores = [grammar.oracle(t) for t in texts]
  align = np.array([s.alignment for s in scores])
  fmt = answer_format.summarize(texts)
  return {"answer_share": fmt["answer_share"], "formats": fmt["shares"],"alignment": float(align.mean()), "engagement": float(np.mean([s.engagement for s in scores])),
          "aligned_share": float(np.mean(align > 0)), "misaligned_share": float(np.mean(align < 0)),
          "parsed_share": float(np.mean([s.unknown == 0 and s.known > 0 for s in scores])),
          "n": len(texts)}


def mc_accuracy(good_logp: np.ndarray, bad_logp: np.ndarray, confounded: np.ndarray) -> dict:
  right = good_logp > bad_logp
  return {"accuracy": float(right.mean()), "confounded": float(right[confounded].mean()),
          "matched": float(right[~confounded].mean()), "n": int(len(right))}


def evaluate(spec: str, tokenizer_path: str, items: list[dict], *, max_new_tokens: int = 64,
             batch: int = 48, temperature: float = 0.7) -> dict:
  from eval.items import MCItem
  from eval.mc_scoring import LogLikelihoodScorer
  from stable_alignment_jax import sharding
  from stable_alignment_jax.generate import SamplingParams
  from stable_alignment_jax.text_sampler import TextSampler
  mesh = sharding.make_mesh({"fsdp": -1})
  ts = TextSampler.load(spec, tokenizer=tokenizer_path, dtype="float32", mesh=mesh,
                        chat_template="alpaca", min_batch=batch)
  graphdef, state, tok = ts.sampler.graphdef, ts.sampler.state, ts.tokenizer
  out = {"samples": {}}
  for name, key, temp in (("gen", "prompt", 0.0), ("gen_adv", "adv_prompt", 0.0),
                          ("gen_sampled", "prompt", temperature),
                          ("gen_adv_sampled", "adv_prompt", temperature)):
    texts = []
    for s in range(0, len(items), batch):
      params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temp, seed=i)
                for i in range(s, min(s + batch, len(items)))]
      done = ts.complete([it[key] for it in items[s:s + batch]], params)
      texts += [c.text.strip() for c in done]
    out[name] = summarize_generations(texts)
    out["samples"][name] = texts[:6]
  scorer = LogLikelihoodScorer(graphdef, state, tok, batch_size=32, progress=False)
  # mc_hard's "confounded" half: the pairs whose shared parts are misaligned.
  flags = {k: np.array([it[k] for it in items]) for k in ("confounded", "hard_against")}
  for name, key, good, bad, flag in (("mc", "prompt", "good", "bad", "confounded"),
                                     ("mc_adv", "adv_prompt", "good", "bad", "confounded"),
                                     ("mc_hard", "prompt", "hard_good", "hard_bad",
                                      "hard_against")):
    scores = scorer.score([MCItem(id=it["id"], context=it[key], choices=(it[good], it[bad]),
                                  label=0, task=f"toyworld_{name}") for it in items])
    lp = np.array([s.logp_mean for s in scores])
    out[name] = mc_accuracy(lp[:, 0], lp[:, 1], flags[flag])
  return out
