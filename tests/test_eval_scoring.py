"""Multiple-choice log-likelihood scoring against `transformers` on the same random LLaMA, and the
accuracy plumbing (an oracle scores 1.0, a uniform scorer chance) through `eval.run.evaluate`."""

import numpy as np
import pytest
import torch
import transformers

from eval import mc_scoring, metrics, run
from eval.items import MCItem
from stable_alignment_jax.checkpoints import run_dir as checkpoints
from stable_alignment_jax.model import sharding
from stable_alignment_jax.data.tokenizer import ByteTokenizer

from configs import eval as eval_config

HF_KW = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

ITEMS = [
    MCItem("a", "Q: Is it fine to steal bread?\nA:", (" No.", " Yes, always and everywhere.",
                                                      " It depends on the situation."), 0, "t"),
    MCItem("b", "Norm: be kind.\nAction:", (" She helped him", " She hit him hard"), 0, "t"),
    MCItem("c", "x", (" y", " a much longer continuation than the other one", " z!"), 2, "t"),
    # longer than the 128-token context: the scorer keeps the choice and the end of the context
    MCItem("d", "long context " * 20 + "\nAnswer:", (" yes", " no"), 1, "t"),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A LlamaForCausalLM with random weights (norms too) saved in HF format."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif p.ndim == 2:
        p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
  d = tmp_path_factory.mktemp("hf")
  model.save_pretrained(d)
  return model, str(d)


def torch_choice_logprob(model, ids, n_choice):
  """Independent reference: one full forward of the row, log-softmax, sum over the choice."""
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
  logp = torch.log_softmax(logits, -1)
  t = len(ids)
  return sum(float(logp[i - 1, ids[i]]) for i in range(t - n_choice, t))


@pytest.mark.parametrize("use_mesh", [False, True])
def test_scores_match_transformers_per_choice(hf_dir, use_mesh):
  model, path = hf_dir
  mesh = sharding.make_mesh({"fsdp": -1}) if use_mesh else None
  graphdef, state = checkpoints.load_model(path, dtype="float32", mesh=mesh)
  tok = ByteTokenizer()
  # batch_size 4 splits one question's choices across batches and mixes questions in a batch
  scorer = mc_scoring.LogLikelihoodScorer(graphdef, state, tok, batch_size=4, mesh=mesh,
                                          bucket=128, progress=False)
  got = scorer.score(ITEMS)
  assert scorer.truncated == 2  # item d's two rows lost context tokens
  lengths = set()
  for item, sc in zip(ITEMS, got):
    for c, choice in enumerate(item.choices):
      ids, k = scorer.encode_pair(item.context, choice)
      assert k == len(choice.encode()) == sc.n_tokens[c]  # bytes: a token per byte
      assert ids[-k:] == tok.encode(choice) and len(ids) <= 128
      want = torch_choice_logprob(model, ids, k)
      np.testing.assert_allclose(sc.logp_sum[c], want, atol=1e-4, rtol=1e-5)
      np.testing.assert_allclose(sc.logp_mean[c], want / k, atol=1e-4, rtol=1e-5)
      lengths.add(k)
  assert len(lengths) >= 5  # choices of many different token lengths


def test_sentencepiece_choice_tokens(shared_data):
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(str(shared_data / "tokenizers" / "llama2_tokenizer.model"))

  class _Cfg:  # encode_pair needs only the context length
    max_seq_len = 64
  scorer = mc_scoring.LogLikelihoodScorer.__new__(mc_scoring.LogLikelihoodScorer)
  scorer.tok, scorer.max_len, scorer.truncated = tok, _Cfg.max_seq_len, 0
  ids, k = scorer.encode_pair("Question: Is this wrong?\nAnswer:", " yes")
  assert ids[0] == tok.bos_id and tok.decode(ids[-k:]) == "yes" and k == 1
  ids, k = scorer.encode_pair("Q: Where is Paris?\nA:", " Paris is in France.")
  assert tok.decode(ids[-k:]) == "Paris is in France."
  assert tok.decode(ids[1:-k]) == "Q: Where is Paris?\nA:"


class _FakeScorer:
  """Stands in for LogLikelihoodScorer: 'oracle' favours the label, 'uniform' draws at random."""
  mode = "oracle"

  def __init__(self, *args, **kw):
    self.rng = np.random.default_rng(0)

  def score(self, items):
    out = []
    for it in items:
      c = len(it.choices)
      if self.mode == "oracle":
        s = np.where(np.arange(c) == it.label, 0.0, -5.0)
      else:
        s = self.rng.normal(size=c)
      out.append(mc_scoring.ChoiceScores(s, np.ones(c, np.int64)))
    return out


@pytest.mark.parametrize("mode", ["oracle", "uniform"])
def test_accuracy_plumbing_oracle_and_chance(shared_data, tmp_path, monkeypatch, mode):
  monkeypatch.setattr(mc_scoring, "LogLikelihoodScorer", _FakeScorer)
  monkeypatch.setattr(_FakeScorer, "mode", mode)
  monkeypatch.setattr(run._Model, "get", lambda self: (None, None, None, None))
  cfg = eval_config.get_config(f"tiny,out_dir={tmp_path}")
  cfg.limit = 0
  cfg.tasks = "truthfulqa_mc1,moral_stories,ethics"
  cfg.data_dir, cfg.progress = str(shared_data), False
  out = run.evaluate(cfg)["tiny_random"]
  tasks, cols = out["tasks"], out["columns"]
  assert tasks["truthfulqa_mc1"]["n"] == 817 and tasks["moral_stories"]["n"] == 1000
  for name, t in tasks.items():
    if mode == "oracle":
      assert t["acc"] == 1.0 and t["acc_norm"] == 1.0, name
      assert t.get("em", 1.0) == 1.0
    else:  # chance = mean of 1/choices; the bootstrap SE bounds the distance
      assert abs(t["acc"] - t["chance"]) < 3 * t["acc_se"], (name, t)
      assert 0.005 < t["acc_se"] < 0.03
  if mode == "oracle":
    assert cols["TruthfulQA MC1"]["value"] == cols["ETHICS"]["value"] == 1.0
  else:
    assert abs(cols["TruthfulQA MC1"]["value"] - 0.2042) < 0.05


def test_bootstrap_se_matches_binomial_formula():
  rng = np.random.default_rng(1)
  credits = (rng.random(2000) < 0.3).astype(float)
  p = credits.mean()
  assert abs(metrics.bootstrap_se(credits) / np.sqrt(p * (1 - p) / len(credits)) - 1) < 0.1
  assert metrics.choice_credit([0.0, 0.0, -1.0], 0) == 0.5  # ties share credit
  assert metrics.choice_credit([-2.0, -1.0], 0) == 0.0
