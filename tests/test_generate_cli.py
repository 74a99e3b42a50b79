"""`python -m stable_alignment_jax.sampling.generate`: run as a real subprocess (and once
in-process for the interactive chat), compared with `Sampler.generate` called directly on the same weights and on
prompts laid out by hand here."""

import json
import os
import subprocess
import sys

import jax
import pytest

import subproc
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.model import sharding
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


@pytest.fixture(scope="module")
def ref():
  """The reference: the same `random:tiny` weights as the CLI loads, sampled directly."""
  tok = load_tokenizer("byte")
  # One device, like the CLI subprocesses below (run_cli drops the tests' 8-device flag).
  mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
  graphdef, state = checkpoints.load_model("random:tiny", mesh=mesh)
  sampler = Sampler(graphdef, state, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)

  def text(prompt: str, max_new: int, stop: str | None = None) -> str:
    ids = sampler.generate([tok.encode(prompt, bos=True)], SamplingParams(max_new_tokens=max_new))[0]
    if ids and ids[-1] == tok.eos_id:
      ids = ids[:-1]
    # The tiny preset's vocabulary (1024) is larger than the byte tokenizer's (259): ids beyond
    # the tokenizer carry no text.
    out = tok.decode([i for i in ids if i < tok.vocab_size])
    return out.split(stop)[0] if stop else out

  return text


CHAT_LINES = "Hi there\n\n/reset\nHi there\nAnd then?\n"
# Prompt lengths and max_tokens keep the sampler to few compiled shapes (16+8, 32+8, 256+8).
BATCH = ["alpha", "a longer second one", "3"]
RUNS = {  # started by the `runs` fixture, checked one per test
    "prompt": (["--checkpoint=random:tiny", "--prompt=Quick fox", "--max_tokens=8"], ""),
    "batch": (["--checkpoint=random:tiny", "--max_tokens=8", "--jsonl"],
              "\n".join(BATCH[:2]) + "\n\n" + BATCH[2] + "\n"),
    "chat": (["--checkpoint=random:tiny", "--chat", "--max_tokens=8"], CHAT_LINES),
    "bad": (["--checkpoint=/no/such/run", "--prompt=hi"], ""),
}


# One device (the reference uses one too); the session's compilation cache (conftest) lets the
# subprocesses after the first reuse its model initialisation.
SUBPROCESS_ENV = subproc.jax_env(PYTHONIOENCODING="utf-8")


@pytest.fixture(scope="module")
def runs():
  procs = {}

  def start(name):
    args, stdin = RUNS[name]
    p = subprocess.Popen([sys.executable, "-m", "stable_alignment_jax.sampling.generate", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT, env=SUBPROCESS_ENV)
    procs[name] = (p, stdin)

  results = {}

  def get(name):
    if name not in results:
      p, stdin = procs[name]
      out, err = p.communicate(stdin.encode(), timeout=600)
      results[name] = (p.returncode, out.decode("utf-8"), err.decode("utf-8", "replace"))
    return results[name]

  start("prompt")
  start("bad")
  get("prompt")  # fills the compilation cache; the others then start together
  for name in RUNS:
    if name not in procs:
      start(name)
  yield get
  for p, _ in procs.values():
    if p.poll() is None:
      p.kill()
      p.wait()


def test_prompt_flag_prints_only_the_greedy_completion(ref, runs):
  rc, out, err = runs("prompt")
  assert rc == 0, err
  assert out == ref("Quick fox", 8) + "\n"  # nothing else on stdout: pipeable
  assert "it/s" not in err and "%|" not in err  # no progress bar


def test_stdin_lines_are_a_batch_in_input_order(ref, runs):
  rc, out, err = runs("batch")
  assert rc == 0, err
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["prompt"] for r in rows] == BATCH  # the blank line is skipped
  assert [r["text"] for r in rows] == [ref(p, 8) for p in BATCH]
  assert all(r["finish_reason"] in ("stop", "length") for r in rows)


def test_bad_checkpoint_is_a_clear_error_with_nonzero_exit(runs):
  rc, out, err = runs("bad")
  assert rc != 0 and out == ""
  assert "/no/such/run" in err and "not found" in err
  assert "Traceback" not in err


def test_interactive_chat_keeps_the_conversation(ref, runs):
  rc, out, err = runs("chat")
  assert rc == 0, err
  stop = "### Instruction:"
  first = f"{PREAMBLE}\n\n### Instruction:\nHi there\n\n### Response:\n"  # laid out by hand
  r1 = ref(first, 8, stop)
  second = f"{first}{r1}\n\n### Instruction:\nAnd then?\n\n### Response:\n"
  r2 = ref(second, 8, stop)
  # "/reset" forgets the first exchange, so "Hi there" is answered the same way twice.
  assert out == f"{r1}\n{r1}\n{r2}\n"
  assert "> " not in err  # no input prompt when stdin is not a terminal


@pytest.mark.slow
def test_chat_on_smollm2_uses_its_template_and_stops_at_im_end(smollm2_dir):
  from stable_alignment_jax.sampling.text_sampler import TextSampler
  question = "What is the capital of France?"
  p = subprocess.run([sys.executable, "-m", "stable_alignment_jax.sampling.generate",
                      f"--checkpoint={smollm2_dir}", "--chat", f"--prompt={question}",
                      "--max_tokens=32", "--jsonl"], capture_output=True, text=True, cwd=ROOT,
                     env=SUBPROCESS_ENV, timeout=600)
  assert p.returncode == 0, p.stderr
  row = json.loads(p.stdout)
  mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])  # as the subprocess
  ts = TextSampler.load(str(smollm2_dir), mesh=mesh)
  want = ts.complete([[{"role": "user", "content": question}]],
                     SamplingParams(max_new_tokens=32))[0]
  assert row["text"] == want.text and row["finish_reason"] == "stop"
  assert want.token_ids[-1] == ts.tokenizer.tok.token_to_id("<|im_end|>")
