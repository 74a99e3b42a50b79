"""MC log-likelihoods of the real SmolLM2 against `transformers` on real TruthfulQA items.

SmolLM2's tokenizer adds no BOS, so a row is `context + choice` as lm-evaluation-harness scores
it; a BOS in front (as the scorer used to add for every tokenizer) moved the choice
log-likelihoods by up to ~1 nat. The reference is one HF forward per row in float64."""

import numpy as np
import pytest
import torch
import transformers

from eval import mc_scoring, truthfulqa
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.data.tokenizer import load_tokenizer


def test_choice_logprobs_match_transformers_without_bos(smollm2_dir, shared_data):
  items = truthfulqa.load_mc1(str(shared_data))[:2]
  tok = load_tokenizer(str(smollm2_dir))
  assert not tok.add_bos
  graphdef, state = checkpoints.load_model(str(smollm2_dir), dtype="float32")
  scorer = mc_scoring.LogLikelihoodScorer(graphdef, state, tok, batch_size=8, progress=False)
  ours = scorer.score(items)
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
  for item, scores in zip(items, ours):
    ref = []
    for choice in item.choices:
      ids, n = scorer.encode_pair(item.context, choice)
      assert ids[:len(tok.encode(item.context))] == tok.encode(item.context)  # no BOS in front
      with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
      ref.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))))
    np.testing.assert_allclose(scores.logp_sum, ref, atol=2e-3, rtol=1e-4)
    assert np.ptp(ref) > 0.1  # the choices really differ
