"""Chain-of-Hindsight (Liu, Sferrazza & Abbeel 2023) as a data transform for SFT.

A prompt's rated responses become one training text that states which answer is better, e.g.
"A good answer: <best>\nA worse answer: <worst>"; the model is trained with plain SFT on that
text (all of it is response), and at inference it is prompted with "A good answer:". The
order of the two parts is drawn at random so the model learns the feedback words, not a position.
"""

import numpy as np

GOOD, BAD = "A good answer:", "A worse answer:"


def chain_of_hindsight(example: dict, rng: np.random.Generator) -> dict:
  """{prompt, responses, ratings, ...} -> the same prompt with one templated feedback response."""
  ratings = [float(r) for r in example["ratings"]]
  responses = [r.decode() if isinstance(r, bytes) else r for r in example["responses"]]
  if not responses:
    raise ValueError("chain_of_hindsight: example has no responses")
  best = int(np.argmax(ratings))
  worst = int(np.argmin(ratings))
  if ratings[best] == ratings[worst]:
    text = f"{GOOD} {responses[best]}"
  else:
    parts = [f"{GOOD} {responses[best]}", f"{BAD} {responses[worst]}"]
    if rng.random() < 0.5:
      parts.reverse()
    text = "\n".join(parts)
  return {**example, "responses": [text], "ratings": [ratings[best]]}
