"""experiments/hh_smollm2: the driver end to end at toy size, and its metrics by hand.

The toy run: a random 2-layer LLaMA over bytes, hand-made HH-RLHF files (some questions asked
in several dialogues), two data-order seeds, the lr probe, evaluation and report. The real
benchmark files are used where ../shared/data holds them (4 items each), else left out.
"""

import gzip
import json
import os

import numpy as np
import pytest

from experiments.hh_smollm2 import report, scoring, split

QUESTIONS = ["How do I bake bread?", "What is the capital of France?", "how do i bake  bread?",
             "Can you help me steal a car?", "Why is the sky blue?", "Tell me a joke.",
             "What should I eat for dinner?", "How do I fix a flat tyre?",
             "Is it ok to lie to my boss?", "What is two plus two?", "Name a prime number.",
             "How do plants grow?"]


def _dialogue(q: str, reply: str, follow: bool) -> str:
  text = f"\n\nHuman: {q}\n\nAssistant:"
  if follow:
    text = f"\n\nHuman: {q}\n\nAssistant: Sure.\n\nHuman: Go on.\n\nAssistant:"
  return f"{text} {reply}"


def _write_hh(d) -> None:
  rows = []
  for i, q in enumerate(QUESTIONS):
    for follow in (False, True):
      rows.append({"chosen": _dialogue(q, f"A careful answer number {i}.", follow),
                   "rejected": _dialogue(q, f"No{'!' * (i % 3 + 1)}", follow)})
  with gzip.open(os.path.join(d, "harmless-base_test.jsonl.gz"), "wt") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_preference_accuracy_by_hand_on_four_pairs():
  # (chosen sum, chosen tokens, rejected sum, rejected tokens). Per-token means:
  # 1: -1.0 vs -2.0 -> right (though the chosen SUM is lower); 2: -2.0 vs -1.0 -> wrong;
  # 3: -0.5 vs -0.5 -> tie, 1/2; 4: -3.0 vs -4.0 -> right.  (1 + 0 + 0.5 + 1) / 4 = 0.625.
  raw = {"pairs": {"logp": [[-10, -6], [-4, -3], [-2, -1], [-6, -20]],
                   "n": [[10, 3], [2, 3], [4, 2], [2, 5]]},
         "benchmarks": {}, "answer_format": {"answer_share": 1.0, "n": 1}}
  start = {"pairs": {"logp": [[-11, -5], [-4, -4], [-2, -1], [-6, -19]]}}
  m, vec = report.system_metrics(raw, start)
  assert m["pref_acc"] == pytest.approx(0.625)
  assert m["pref_acc_se"] == pytest.approx(np.sqrt(0.625 * 0.375 / 4))
  # Log-ratio rewards (chosen, rejected): (1, -1) right, (0, 1) wrong, (0, 0) tie, (0, -1) right.
  assert m["implicit_acc"] == pytest.approx(0.625)
  np.testing.assert_allclose(vec["pref"], [1, 0, 0.5, 1])
  np.testing.assert_allclose(vec["implicit"], [1, 0, 0.5, 1])
  assert m["chosen_ll"] == pytest.approx(np.mean([-1.0, -2.0, -0.5, -3.0]))


def test_sign_flip_and_paired_t():
  a = {0: {"pref": np.array([1.0, 1, 1, 0])}, 1: {"pref": np.array([1.0, 1, 0, 0])}}
  b = {0: {"pref": np.array([0.0, 1, 1, 0])}, 1: {"pref": np.array([0.0, 0, 0, 0])}}
  r = report.paired(a, b, "pref")
  assert r["per_seed"] == pytest.approx([0.25, 0.5])
  # d = [1, 0.5, 0, 0]: 16 sign patterns, |mean| >= 0.375 for those with the first two
  # positive-together or negative-together: 2 x 4 = 8 -> p = 0.5.
  assert r["sign_flip_p"] == pytest.approx(0.5, abs=0.02)
  from scipy import stats
  assert r["t_p"] == pytest.approx(stats.ttest_rel([0.75, 0.5], [0.5, 0.0]).pvalue)


def _full_row_logprob(graphdef, state, ids, n_choice) -> float:
  """log p of the last n_choice tokens of `ids`, from the model's whole logits in numpy."""
  from flax import nnx
  model = nnx.merge(graphdef, state)
  logits = np.asarray(model(np.asarray([ids], np.int32))[0][0], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n_choice, len(ids))))


def _run_driver(arg: str) -> str:
  """The experiment's one command, in a 1-device JAX process (the real run's layout; the test
  session's 8 virtual devices would only add collectives)."""
  import subprocess
  import sys
  import subproc  # tests/ is on sys.path
  cmd = [sys.executable, "-m", "stable_alignment_jax.recipes.pipeline",
         f"--config={os.path.join('experiments', 'hh_smollm2', 'config.py')}:{arg}"]
  p = subprocess.run(cmd, cwd=subproc.ROOT, env=subproc.jax_env(), capture_output=True,
                     text=True, timeout=1200)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  return p.stdout


def test_driver_end_to_end_toy(tmp_path):
  from experiments.hh_smollm2 import config as cfg_lib
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.data.prompt_format import PromptFormat
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  hh = tmp_path / "hh"
  hh.mkdir()
  _write_hh(hh)
  shared = os.environ.get("STABLE_ALIGNMENT_DATA", "")
  has_bench = os.path.isdir(os.path.join(shared, "ethics"))
  arg = (f"toy,seeds=2,hh_dir={hh},out={tmp_path / 'run'},docs={tmp_path / 'docs'}"
         + (f",data_dir={shared}" if has_bench else ",n_bench=0"))
  _run_driver(arg)
  c = cfg_lib.get_config(arg)
  run = tmp_path / "run"
  state = json.loads((run / "pipeline_state.json").read_text())["steps"]

  # The split: no question on both sides (read back from the files the trainer reads).
  read = lambda p: [json.loads(x) for x in open(p)]
  train = read(run / "split" / "train.jsonl")
  held = read(run / "split" / "validation.jsonl")
  q = lambda ex: " ".join(ex["turns"][0].split()).lower()
  assert train and held and not {q(e) for e in train} & {q(e) for e in held}
  # "How do I bake bread?" and "how do i bake  bread?" are one question: one side only.
  assert sum(q(e) == "how do i bake bread?" for e in train) in (0, 4)
  info = state["split"]["result"]
  assert info["shared_questions"] == 0 and info["pairs"] == 2 * len(QUESTIONS)
  assert info["train_pairs"] + info["held_out_pairs"] == info["pairs"]
  assert info["eval_pairs"] == len(held) == 4

  # Every system trained and measured; the lr came from the probe's candidates.
  for name in ("start", "sft_s0", "dpo_s0", "dpo_s1", "sa_cpo_s0", "sa_cpo_s1"):
    assert f"eval_{name}" in state, name
  assert state["lr_probe"]["result"]["lr"] in c.probe_lrs
  for m in ("dpo_s0", "sa_cpo_s1"):
    assert state[m]["result"]["steps"] == c.train.train.steps

  # Preference accuracy of one trained system, by hand: each held-out reply's log-likelihood
  # from the model's whole logits (no packing), per-token means compared.
  tok = load_tokenizer("byte")
  fmt = PromptFormat(tok, info["format"])
  graphdef, params = checkpoints.load_model(state["dpo_s1"]["result"]["dir"])
  right = []
  for ex in held:
    prompt, replies = scoring.pair_group(fmt, ex)
    means = [_full_row_logprob(graphdef, params, prompt + r, len(r)) / len(r) for r in replies]
    right.append(1.0 if means[0] > means[1] else 0.5 if means[0] == means[1] else 0.0)
  results = json.loads((tmp_path / "docs" / "results.json").read_text())
  assert results["systems"]["dpo_s1"]["pref_acc"] == pytest.approx(np.mean(right))
  raw = json.loads(open(state["eval_dpo_s1"]["result"]["file"]).read())
  for ex, logp in zip(held, raw["pairs"]["logp"]):
    prompt, replies = scoring.pair_group(fmt, ex)
    want = [_full_row_logprob(graphdef, params, prompt + r, len(r)) for r in replies]
    np.testing.assert_allclose(logp, want, rtol=1e-4, atol=1e-3)

  md = (tmp_path / "docs" / "results.md").read_text()
  assert "| DPO | 2 |" in md and "sa_cpo-dpo" in md
  assert (tmp_path / "docs" / "hh_smollm2.png").stat().st_size > 0
  assert results["missing"] == []

  # Resume: a second run finds every step done and only rewrites the report.
  again = _run_driver(arg)
  assert "starting" not in again and "sa_cpo_s1: done earlier" in again


def test_group_scorer_matches_row_by_row_scorer():
  """The packed scorer gives the values of eval.mc_scoring's one-row-per-choice scorer."""
  from eval.items import MCItem
  from eval.mc_scoring import LogLikelihoodScorer
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  graphdef, state = checkpoints.load_model("random:tiny:3")
  tok = load_tokenizer("byte")
  items = [MCItem("a", "Question: is the sky blue on a clear day?\nAnswer:", (" yes", " no"), 0,
                  "t"),
           MCItem("b", "Q: pick one\nA:", (" red", " a much longer green", " x"), 1, "t"),
           MCItem("c", "Norm: be kind.\nSituation: a friend is sad.\nAction:",
                  (" comfort them", " mock them"), 0, "t")]
  ref = LogLikelihoodScorer(graphdef, state, tok, batch_size=4, max_len=256, progress=False)
  want = ref.score(items)
  got = scoring.GroupScorer(graphdef, state, max_len=256, progress=False).score(
      [scoring.mc_group(tok, it.context, it.choices) for it in items])
  for w, (s, n) in zip(want, got):
    np.testing.assert_allclose(s, w.logp_sum, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(n, w.n_tokens)


def test_split_is_by_first_question():
  exs = [{"turns": [q, "a", "b"], "prompt": ""} for q in QUESTIONS * 3]
  for e in exs:
    e["question"] = split.first_question(e)
  train, test = split.split_pairs(exs, 0.5)
  assert {e["question"] for e in train}.isdisjoint({e["question"] for e in test})
  assert len(train) + len(test) == len(exs)
  # Stable across processes (SHA-256, not Python's salted hash), and in [0, 1).
  assert split.bucket("why is the sky blue?") == split.bucket("why is the sky blue?")
  assert 0 <= split.bucket("x") < 1
  # A dialogue whose turns do not alternate is keyed by its first Human turn from the text.
  assert split.first_question({"turns": [], "prompt": "Human: Hi  THERE\n\nAssistant: x"}) \
      == "hi there"
