"""`python -m stable_alignment_jax.sampling.generate`: text from a checkpoint on the command line.

  python -m stable_alignment_jax.sampling.generate --checkpoint=DIR --prompt="Once upon a time"
  printf 'first prompt\\nsecond prompt\\n' | \\
    python -m stable_alignment_jax.sampling.generate --checkpoint=DIR
  python -m stable_alignment_jax.sampling.generate --checkpoint=DIR --chat   # a conversation

Checkpoint: our run directory, an HF LLaMA directory or `random:tiny[:seed]` (see
checkpoints.load_model); the tokenizer defaults to the checkpoint's own.

Modes:
- `--prompt=TEXT`: one completion, printed followed by a newline.
- no `--prompt`: every non-empty stdin line is a prompt; all of them are generated together in
  batched sampler calls and printed in input order, one completion per prompt. Completions may
  contain newlines, so `--jsonl` prints one JSON object per line instead
  (`{"prompt", "text", "finish_reason"}`) for scripts.
- `--chat`: the prompt(s) are user turns rendered through the chat template (by default the
  checkpoint's own, stopping at its end-of-turn token; Alpaca for a model without one).
  Without `--prompt`, stdin lines are the turns of one conversation: each reply is printed and
  kept, so the next turn sees the whole history (oldest turns are dropped when the context is
  full). `/reset` starts over, `/exit` (or EOF) ends.

Output is quiet for piping: stdout carries only generated text; progress bars, JAX/absl logs and
warnings are off, errors go to stderr with a non-zero exit status.
"""

import asyncio
import json
import logging
import os
import sys
import warnings
from typing import Sequence, TextIO

from absl import app, flags


def _quiet():
  """Silences everything that is not our output: C++/absl/JAX logging, warnings, tqdm."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ["TQDM_DISABLE"] = "1"
  warnings.filterwarnings("ignore")
  logging.getLogger().setLevel(logging.ERROR)
  for name in ("jax", "absl", "orbax", "flax"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


class _Generator:
  """Prompt texts -> completions through the serving engine (same encode/finish as the server)."""

  def __init__(self, engine, args):
    self.engine, self.args = engine, args

  def token_budget(self, ids: Sequence[int]) -> int:
    return self.engine.resolve_max_tokens(len(ids), self.args.max_tokens)

  def run(self, prompts: Sequence[str], stop: Sequence[str]):
    ids = [self.engine.encode(p) for p in prompts]
    budgets = [self.token_budget(x) for x in ids]
    a = self.args
    outs = asyncio.run(self.engine.complete(ids, max_tokens=budgets, temperature=a.temperature,
                                            top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=stop))
    return [o[0] for o in outs]


def _chat_loop(gen: _Generator, lines: TextIO, out: TextIO, err: TextIO, system: str | None,
               interactive: bool):
  """One conversation over `lines`; history is kept as OpenAI-style messages."""
  from stable_alignment_jax.serving.engine import ContextError
  engine = gen.engine
  head = [{"role": "system", "content": system}] if system is not None else []
  history: list[dict] = []
  stop = list(gen.args.stop) + [s for s in engine.template.stop if s not in gen.args.stop]
  while True:
    if interactive:
      err.write("> ")
      err.flush()
    line = lines.readline()
    if not line:
      return
    text = line.rstrip("\n")
    if not text.strip():
      continue
    if text.strip() == "/exit":
      return
    if text.strip() == "/reset":
      history = []
      continue
    turn = history + [{"role": "user", "content": text}]
    # Drop the oldest exchanges until the prompt leaves room for the reply.
    while True:
      prompt = engine.chat_prompt(head + turn)
      try:
        gen.token_budget(engine.encode(prompt))
        break
      except ContextError as e:
        if len(turn) <= 1:
          err.write(f"error: {e}\n")
          turn = None
          break
        turn = turn[2:]
    if turn is None:
      continue
    reply = gen.run([prompt], stop)[0]
    out.write(reply.text + "\n")
    out.flush()
    history = turn + [{"role": "assistant", "content": reply.text}]


def main(argv: Sequence[str]):
  try:
    _main(argv)
  except BrokenPipeError:  # the reader went away (e.g. `| head -1`): stop quietly, like `cat`
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    raise SystemExit(141) from None


def _main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  args = flags.FLAGS
  if args.checkpoint is None:
    raise app.UsageError("--checkpoint is required", exitcode=2)
  _quiet()
  if args.max_tokens < 0:
    raise SystemExit(f"error: --max_tokens must be >= 0, got {args.max_tokens}")
  from stable_alignment_jax.serving.engine import ContextError, load_engine
  try:
    engine = load_engine(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                         cache_dtype=args.cache_dtype, chat_template=args.chat_template,
                         max_batch=args.max_batch, wait_ms=0.0)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: cannot load --checkpoint={args.checkpoint}: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  engine.start()
  try:
    gen = _Generator(engine, args)
    if args.chat and args.prompt is None:
      _chat_loop(gen, sys.stdin, sys.stdout, sys.stderr, args.system, sys.stdin.isatty())
      return
    if args.prompt is not None:
      texts = [args.prompt]
    else:
      texts = [line.rstrip("\n") for line in sys.stdin]
      texts = [t for t in texts if t.strip()]
    if args.chat:
      head = [{"role": "system", "content": args.system}] if args.system is not None else []
      prompts = [engine.chat_prompt(head + [{"role": "user", "content": t}]) for t in texts]
      stop = list(args.stop) + [s for s in engine.template.stop if s not in args.stop]
    else:
      prompts, stop = texts, list(args.stop)
    try:
      outs = gen.run(prompts, stop) if prompts else []
    except (ContextError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    for t, o in zip(texts, outs):
      if args.jsonl:
        print(json.dumps({"prompt": t, "text": o.text, "finish_reason": o.finish_reason},
                         ensure_ascii=False))
      else:
        print(o.text)
    sys.stdout.flush()
  finally:
    engine.stop()


def cli():
  """The command line, also setup.py's console script
  (`python -m stable_alignment_jax.sampling.generate` runs it too). Flags are defined here, not at import; each `--snake_case` flag also answers to
  its `--kebab-case` spelling."""

  from stable_alignment_jax.serving.engine import define_flag as flag, define_model_flags
  define_model_flags()
  flag(flags.DEFINE_string, "prompt", None,
       "the prompt (default: read prompts from stdin, one a line)")
  flag(flags.DEFINE_integer, "max_tokens", 128, "most new tokens per completion")
  flag(flags.DEFINE_float, "temperature", 0.0, "0 = greedy (default)")
  flag(flags.DEFINE_float, "top_p", 1.0, None)
  flag(flags.DEFINE_integer, "top_k", 0, "0 = off")
  flag(flags.DEFINE_integer, "seed", 0, None)
  flag(flags.DEFINE_multi_string, "stop", [], "stop string (repeatable)")
  flag(flags.DEFINE_boolean, "chat", False, "render prompts through the chat template; "
       "interactive conversation when no --prompt is given")
  flag(flags.DEFINE_string, "system", None, "system message for --chat (default: the template's)")
  flag(flags.DEFINE_boolean, "jsonl", False, "batch mode: one JSON object per completion")
  flag(flags.DEFINE_integer, "max_batch", 32, "most prompts in one sampler call")
  app.run(main)


if __name__ == "__main__":
  cli()
