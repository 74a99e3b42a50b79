"""Whether an OpenAI-compatible server's logprobs can be read as a choice, learned once per model.

A choice is the next token after a cue the reply has already begun ("Rating:"). Over the chat
API that needs the server to continue a final assistant message (vLLM's `continue_final_message`
/ `add_generation_prompt=false`). Servers that ignore those fields close the assistant turn and
open a fresh one: the top tokens are then the first token of a new reply, and reading them as the
rating is silently wrong. So, before the first reading, `probe` asks:

1. does the server return logprobs at all (a 4xx, or `logprobs: null`, says no)?
2. chat API: does a final assistant message "1" add the tokens of "1" to the prompt, and nothing
   else? Two one-token requests, the user message alone (generation prompt) and the same with
   the final assistant message continued, must differ by 0-2 prompt tokens (`usage`): "1" is one
   token (two where the template's newline merges or splits). A server that closes the turn adds
   the end-of-turn marker and a new assistant header as well (chatml: 6 tokens). This checks the
   prompt the server built, so it holds for any model, trained or random. A server that reports
   no prompt token counts cannot be checked, and is not trusted.
3. unverified over chat with `tokenizer` configured: the backend renders the chat with the
   model's own template and reads through the completions API (raw text, continued as sent),
   if that returns logprobs.

The completions API (`api=completions`) continues its text as sent: only (1) is asked.
"""

import dataclasses
import math

import openai

from stable_alignment_jax.sandbox.backends.request import Request

PROBE_USER = "Write the number one."
PROBE_PREFIX = "1"
MAX_PREFIX_TOKENS = 2


@dataclasses.dataclass
class Reading:
  how: str  # chat (continuation verified) | completions (raw text) | template | text
  why: str
  requests: int = 0

  @property
  def verified(self) -> bool:
    return self.how != "text"

  def line(self, backend: str, model: str) -> str:
    what = "verified choices" if self.verified else "text (not as choices)"
    return f"backend {backend}, model {model!r}: ratings read as {what}: {self.why}"

  def as_dict(self) -> dict:
    return {"how": self.how, "verified": self.verified, "why": self.why}


def top_tokens(resp: dict, api: str) -> dict[str, float] | None:
  """The first generated token's top logprobs {token: logprob} from a reply; None if absent."""
  lp = (resp.get("choices") or [{}])[0].get("logprobs")
  if api == "chat":
    content = (lp or {}).get("content")
    top = ({t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or ()}
           if content else None)
  else:
    tops = (lp or {}).get("top_logprobs")
    top = dict(tops[0] or {}) if tops else None
  return {t: v for t, v in top.items() if v is not None} if top else None


def space_token(top: dict[str, float], min_p: float = 0.01) -> str | None:
  """The most likely next token that is only spaces (a tokenizer that writes "Rating: 5" as
  "Rating:", " ", "5"), when it has at least `min_p`; None otherwise."""
  spaces = {t: v for t, v in top.items() if t and not t.strip(" ") and math.exp(v) >= min_p}
  return max(spaces, key=spaces.get) if spaces else None


def _mass(top: dict[str, float] | None, choice: str) -> float:
  return sum(math.exp(v) for t, v in (top or {}).items() if t.strip() == choice)


def choice_logprobs(top: dict[str, float], choices, space: str | None = None,
                    after_space: dict[str, float] | None = None) -> list[float] | None:
  """One log-prob per choice: the top tokens whose stripped text is the choice (" 5" and "5")
  summed, plus, when the next token may be a bare `space`, p(space) * p(choice | space);
  -inf for a choice seen nowhere; None when no choice is."""
  p_space = math.exp(top[space]) if space is not None and after_space else 0.0
  out = []
  for c in choices:
    p = _mass(top, c) + p_space * _mass(after_space, c)
    out.append(math.log(p) if p > 0 else -math.inf)
  return out if any(math.isfinite(x) for x in out) else None


def _prompt_tokens(resp: dict) -> int:
  return int(((resp or {}).get("usage") or {}).get("prompt_tokens") or 0)


async def probe(backend, model: str) -> Reading:
  """How `backend` (an OpenAIBackend) can read choices from `model`; transient failures are
  retried under the backend's retry budget, a 4xx answer is the server's 'no'."""
  r = Request(backend.name, model, PROBE_USER, 1, 0.0, 1.0, 0)
  count = [0]

  async def ask(api, body):
    async def call(_r):
      count[0] += 1
      try:
        return await backend._post(api, body)
      except openai.APIStatusError as e:
        if e.status_code >= 500 or e.status_code == 429:
          raise
        return e  # the server's refusal: an answer, not an outage

    return await backend._one(r, call)

  def logprob_fields(api):
    if api == "chat":
      return dict(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=backend.top_logprobs)
    return dict(max_tokens=1, temperature=0.0, logprobs=backend.top_logprobs)

  def refusal(resp, api) -> str | None:
    if isinstance(resp, openai.APIStatusError):
      return f"the server refuses logprobs (HTTP {resp.status_code}: {resp.message})"
    if not top_tokens(resp, api):
      return "the server returns no logprobs"
    return None

  def done(how, why):
    return Reading(how, why, count[0])

  if backend.api == "completions":
    api, body = "completions", {"model": model, "seed": 0, "prompt": PROBE_USER,
                                **logprob_fields("completions")}
    no = refusal(await ask(api, body), api)
    return done("text", no) if no else done(
        "completions", "the completions API continues the prompt text as sent, with logprobs")

  base = {"model": model, "seed": 0, **logprob_fields("chat")}
  plain = await ask("chat", {**base, "messages": [{"role": "user", "content": PROBE_USER}]})
  no = refusal(plain, "chat")
  why = None
  if no is None:
    cont = await ask("chat", {**base, "messages": [
        {"role": "user", "content": PROBE_USER},
        {"role": "assistant", "content": PROBE_PREFIX}],
        "continue_final_message": True, "add_generation_prompt": False})
    no = refusal(cont, "chat")
    if no is None:
      n0, n1 = _prompt_tokens(plain), _prompt_tokens(cont)
      if not n0 or not n1:
        why = ("the server reports no prompt token counts, so whether it continues a final "
               "assistant message cannot be checked")
      elif 0 <= n1 - n0 <= MAX_PREFIX_TOKENS:
        return done("chat", f"the server continues a final assistant message "
                            f"(continue_final_message: +{n1 - n0} prompt tokens for "
                            f"{PROBE_PREFIX!r})")
      else:
        why = (f"the server ignores continue_final_message (a final assistant message "
               f"{PROBE_PREFIX!r} added {n1 - n0} prompt tokens, not 0-{MAX_PREFIX_TOKENS}: it "
               f"closes the turn and starts a new reply)")
  if no is not None:
    return done("text", no)
  if not backend.tokenizer_path:
    return done("text", why + "; set the backend's `tokenizer` to the model's tokenizer to read "
                "choices through the completions API")
  try:
    from stable_alignment_jax.data.tokenizer import render_chat
    text = render_chat(backend.template(), [{"role": "user", "content": PROBE_USER},
                                            {"role": "assistant", "content": PROBE_PREFIX}],
                       add_generation_prompt=False, continue_final_message=True)
  except (OSError, ValueError) as e:
    return done("text", f"{why}; the tokenizer {backend.tokenizer_path!r} cannot render the "
                f"chat ({e})")
  resp = await ask("completions", {"model": model, "seed": 0, "prompt": text,
                                   **logprob_fields("completions")})
  no = refusal(resp, "completions")
  if no is not None:
    return done("text", f"{why}; the completions API: {no}")
  return done("template", f"{why}; read through the completions API with the chat rendered by "
                          f"the model's own template ({backend.tokenizer_path})")
