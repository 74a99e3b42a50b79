"""Our model answers the generation benchmarks' prompts (HH, HH-A) through `TextSampler`.

Prompts are raw text (already in the layout being evaluated), encoded under the tokenizer's BOS
policy, cut into batches, and sampled with per-prompt seeds (the run seed plus the item's
position), so an answer does not depend on which batch it landed in and a resumed run reproduces
it. A prompt too long for the model context keeps its last tokens (the `### Response:` cue and the
end of the question) with BOS first; such prompts are counted.
"""

import sys
from typing import Sequence

from tqdm import tqdm

from stable_alignment_jax.sampling.generate import SamplingParams
from stable_alignment_jax.sampling.text_sampler import TextSampler


class AnswerGenerator:

  def __init__(self, graphdef, state, tokenizer, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               batch_size: int = 16, mesh=None, progress: bool = True):
    self.sampler = TextSampler(graphdef, state, tokenizer, mesh=mesh)
    self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
    self.seed, self.batch_size, self.progress = seed, batch_size, progress
    self.budget = self.sampler.prompt_budget(max_new_tokens)
    self.truncated = 0

  def generate(self, prompts: Sequence[str], positions: Sequence[int]) -> list[dict]:
    """Answers for prompts; positions (the items' indices in their task) seed the sampling."""
    out = []
    vocab = self.sampler.tokenizer.vocab_size
    starts = range(0, len(prompts), self.batch_size)
    for s in tqdm(starts, desc="generate", unit="batch", file=sys.stderr,
                  disable=not self.progress or not prompts):
      params = [SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_p=self.top_p, seed=(self.seed * 1_000_003 + pos) % 2**32)
                for pos in positions[s:s + self.batch_size]]
      for c in self.sampler.complete(prompts[s:s + self.batch_size], params):
        self.truncated += c.truncated
        ids = c.token_ids
        if ids and ids[-1] in self.sampler.stop_ids:
          ids = ids[:-1]
        # a model whose vocabulary is larger than its tokenizer's (tiny test presets) can
        # sample ids nothing decodes; they are dropped from the text and counted
        known = [i for i in ids if i < vocab]
        out.append({"answer": c.text.strip(), "n_tokens": len(ids),
                    "undecodable": len(ids) - len(known)})
    return out
