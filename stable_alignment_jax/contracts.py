"""Facts several layers must agree on, each written once. Imports nothing of ours, so every
layer (model, data, sampling, serving, training, sandbox, data_prep, eval) may import it."""


def bucket(n: int, minimum: int = 1) -> int:
  """The length (or batch) `n` is padded to: the next power of two, at least `minimum`, so every
  size of a bucket shares one compiled program (the sampler, the server's batcher, PPO's room
  check)."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


# --- the three kinds of alignment data (data_prep builds them; the stages train them) ------------

KINDS = ("imitation", "self_critic", "realignment")
STAGE_KINDS = {"stage1": "imitation", "stage2": "self_critic", "stage3": "realignment"}

# --- prompt texts and markers (training data, the sampler's chat template, evaluation) ----------

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Alpaca's two prompt layouts (without / with an input block).
ALPACA_NO_INPUT = (ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
REVISED_MARKER = "Here is the revised response:"  # before the revision in a realignment reply
FEEDBACK_HEADER = "Feedback:"  # the first line of a (bulleted) realignment response
CRITIQUE_PREFIX = "Critique:"  # the start of every self-critic response


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca prompt of an instruction (and its input block when there is one)."""
  if input_text:
    return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
  return ALPACA_NO_INPUT.format(instruction=instruction)


# --- the SANDBOX export (DESIGN.md "Sandbox export"): one Back-Scatter episode a JSONL line ------
# sandbox/export.py writes and checks it; data_prep/export.py reads and checks it. Both take the
# shape from here (data_prep never imports sandbox).

EXPORT_TOP_KEYS = ("run_id", "round", "agent", "agent_model", "question", "draft", "feedback",
                   "revised")
EXPORT_ANSWER_KEYS = ("text", "moral", "engagement")  # draft and revised
EXPORT_FEEDBACK_KEYS = ("peer", "rating", "reason")
EXPORT_SCORE_RANGE = (1, 7)  # observer scores and peer ratings: the paper's 1-7 scale
# Beside a score, optionally: how it was read, and for a choice its distribution and mean.
EXPORT_SOURCES = ("text", "choice")
EXPORT_DETAIL_SUFFIXES = ("_source", "_probs", "_expected")
