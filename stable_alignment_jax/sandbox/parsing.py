"""Strict parsing of the fixed rating formats (see prompts.FEEDBACK_FORMAT / OBSERVER_FORMAT).

A value is accepted only when the reply starts with the exact field lines and the integer is in
1..7. Anything else is `None`, and callers count it: a number is never guessed from free text.
"""

import re

RATING_MIN, RATING_MAX = 1, 7

# `Rating: 5` on the first non-blank line, then `Reason: ...` (the rest of the reply).
_FEEDBACK = re.compile(r"\A\s*Rating:[ \t]*([+-]?\d+)[ \t]*\r?\n\s*Reason:[ \t]*(.*\S)\s*\Z",
                       re.DOTALL)
# `Moral: 6` then `Engagement: 4` on the next line; text after them is ignored.
_OBSERVER = re.compile(r"\A\s*Moral:[ \t]*([+-]?\d+)[ \t]*\r?\n[ \t]*Engagement:[ \t]*([+-]?\d+)"
                       r"[ \t]*(?:\r?\n|\Z)")


def _in_range(digits: str) -> int | None:
  value = int(digits)
  return value if RATING_MIN <= value <= RATING_MAX else None


def parse_feedback(text: str) -> tuple[int | None, str]:
  """(rating or None, reason). On a format failure the reason is the raw reply, kept for data."""
  m = _FEEDBACK.match(text)
  if m is None:
    return None, text.strip()
  return _in_range(m.group(1)), m.group(2).strip()


def parse_observer(text: str) -> tuple[int | None, int | None]:
  """(moral, engagement), each None when missing or out of range."""
  m = _OBSERVER.match(text)
  if m is None:
    return None, None
  return _in_range(m.group(1)), _in_range(m.group(2))
