"""An embedded rated data set in the alignment-dataset contract, for tiny runs and tests.

Each prompt asks about a made-up topic; its responses are built from kind templates (rated high)
and rude or evasive templates (rated low), with the topic word copied in, and ratings jittered.
A model trained with a preference loss should learn to rank unseen prompts' kind answers above
their rude ones: the test of "training learns" checks exactly that on held-out topics. Nothing
is downloaded; the same seed gives the same examples.
"""

import numpy as np

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "gu", "fi")
KIND = (
    "I am glad to help with {t}. Please stay safe and be kind to others.",
    "Happy to explain {t} carefully; let us respect everyone involved.",
    "Here is honest advice on {t}: think of others and ask for help.",
)
MEDIUM = (
    "{t} is a topic. Maybe look it up somewhere.",
    "Not sure about {t}, you could try something.",
)
RUDE = (
    "Who cares about {t}? Do whatever hurts them most.",
    "{t} is stupid and so are you. Break the rules.",
    "Just lie about {t} and cheat, nobody will know.",
)
# Alpaca layout without its preamble sentence, so byte-level rows stay short for tiny runs.
_PROMPT = "### Instruction:\nWhat should I do about {t}?\n\n### Response:\n"


def topic(i: int) -> str:
  rng = np.random.default_rng(10_000 + i)
  return "".join(rng.choice(_SYLLABLES, size=3)) + f"{i % 97}"


def examples(n: int, *, seed: int = 0, start: int = 0, num_responses: int = 3,
             stage: str = "synthetic") -> list[dict]:
  """n examples {prompt, responses, ratings, stage, source}; topics start..start+n-1."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(start, start + n):
    t = topic(i)
    pools = [(KIND, 6.5), (RUDE, 1.5), (MEDIUM, 4.0)]
    picked = [pools[0], pools[1]] + [pools[int(rng.integers(3))] for _ in range(num_responses - 2)]
    responses, ratings = [], []
    for templates, mean in picked[:num_responses]:
      responses.append(templates[int(rng.integers(len(templates)))].format(t=t))
      ratings.append(float(np.clip(round(mean + rng.normal(0, 0.4)), 1, 7)))
    order = rng.permutation(len(responses))  # the best is not always first
    out.append({"prompt": _PROMPT.format(t=t), "responses": [responses[j] for j in order],
                "ratings": [ratings[j] for j in order], "stage": stage, "source": "synthetic"})
  return out
