"""Token fidelity of training rows: a row is the tokenisation of prompt + response as ONE text
(checked against transformers' own tokenizers), the loss mask covers exactly the response's
tokens, BOS follows the tokenizer's `add_bos`, a bad id is an error, and warmup 0 is no warmup."""

import json
import shutil

import ml_collections
import numpy as np
import pytest
import transformers

from data_prep import alignment_examples as ax
from stable_alignment_jax.data import loader as data
from stable_alignment_jax.training import optim
from stable_alignment_jax.data.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture
def llama(shared_data, tmp_path):
  src = shared_data / "tokenizers" / "llama2_tokenizer.model"
  d = tmp_path / "llama"
  d.mkdir()
  shutil.copy(src, d / "tokenizer.model")
  return load_tokenizer(str(src)), transformers.LlamaTokenizer.from_pretrained(str(d))


def _hf_ids(hf, text):
  return hf(text, add_special_tokens=False)["input_ids"]


def test_llama_alpaca_row_is_the_joint_tokenisation(llama):
  tok, hf = llama
  prompt = ax.alpaca_prompt("How do I move a heavy box?")
  responses = ["Put it on a trolley.", "Lift with your legs, é ü 你好."]
  ex = {"prompt": prompt, "responses": responses, "ratings": [5.0, 3.0]}
  out = data.encode_example(ex, tok, max_len=96, num_responses=2)
  n_prompt = len(_hf_ids(hf, prompt))
  for k, r in enumerate(responses):
    want = [tok.bos_id] + _hf_ids(hf, prompt + r) + [tok.eos_id]
    row = out["tokens"][k]
    np.testing.assert_array_equal(row[:len(want)], want)
    assert (row[len(want):] == tok.pad_id).all()
    mask = np.zeros(96)
    mask[1 + n_prompt:len(want)] = 1  # the response's tokens and EOS, nothing of the prompt
    np.testing.assert_array_equal(out["loss_mask"][k], mask)
  # After "### Response:\n" the response starts without SentencePiece's dummy-prefix space:
  # the authors' code, TRL and our MC scorer all see "Put", not "▁Put".
  first = int(out["tokens"][0, 1 + n_prompt])
  assert hf.convert_ids_to_tokens([first]) == ["Put"]


def test_a_token_straddling_the_boundary_belongs_to_the_response(llama):
  tok, hf = llama
  # "Hel" alone ends in pieces that "Hello" merges: the joint text's token differs from the
  # prompt's last one, so the mask starts at that (straddling) token.
  ex = {"prompt": "Say Hel", "responses": ["lo there"], "ratings": [1.0]}
  prompt_ids = [tok.bos_id] + _hf_ids(hf, "Say Hel")
  joint = [tok.bos_id] + _hf_ids(hf, "Say Hello there") + [tok.eos_id]
  shared = next(i for i, (a, b) in enumerate(zip(prompt_ids, joint)) if a != b)
  assert shared < len(prompt_ids)  # this case does straddle
  out = data.encode_example(ex, tok, max_len=32, num_responses=1)
  np.testing.assert_array_equal(out["tokens"][0, :len(joint)], joint)
  np.testing.assert_array_equal(np.flatnonzero(out["loss_mask"][0]),
                                np.arange(shared, len(joint)))
  loader = data.make_loader([ex], tok, global_batch_size=1, max_len=32, num_responses=1,
                            seed=0, shard_index=0, shard_count=1)
  assert loader.stats["min_prompt_len"] == shared  # what the rows really share


def test_byte_level_rows_are_the_joint_tokenisation(smollm2_dir):
  tok = load_tokenizer(str(smollm2_dir))
  hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
  prompt = ax.alpaca_prompt("Is it fine to lie?")
  ex = {"prompt": prompt, "responses": [" No.", "Never, é 你好!"], "ratings": [2.0, 1.0]}
  out = data.encode_example(ex, tok, max_len=128, num_responses=2, prompt_format="alpaca")
  assert not tok.add_bos  # SmolLM2 adds no BOS: neither does the row
  for k, r in enumerate(ex["responses"]):
    want = _hf_ids(hf, prompt + r) + [tok.eos_id]
    np.testing.assert_array_equal(out["tokens"][k, :len(want)], want)
    np.testing.assert_array_equal(np.flatnonzero(out["loss_mask"][k]),
                                  np.arange(len(_hf_ids(hf, prompt)), len(want)))
  # The zero-dependency byte tokenizer: bytes + 3, BOS 1, EOS 2.
  b = ByteTokenizer()
  out = data.encode_example({"prompt": "é?", "responses": ["ok"], "ratings": [1.0]}, b,
                            max_len=8, num_responses=1)
  np.testing.assert_array_equal(out["tokens"][0], [1, 0xC3 + 3, 0xA9 + 3, ord("?") + 3,
                                                   ord("o") + 3, ord("k") + 3, 2, 0])


def _no_bos_dir(path):
  """A byte-level BPE tokenizer.json whose config names no BOS token at all."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(["a question and an answer"] * 10, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<eos>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path.mkdir()
  t.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>"}))
  return str(path)


def test_a_tokenizer_without_bos_gives_no_bos_and_no_minus_one(tmp_path):
  tok = load_tokenizer(_no_bos_dir(tmp_path / "nobos"))
  assert tok.bos_id == -1 and not tok.add_bos
  ex = {"prompt": "a question", "responses": [" an answer"], "ratings": [1.0]}
  out = data.encode_example(ex, tok, max_len=32, num_responses=1)
  want = tok.encode("a question an answer") + [tok.eos_id]
  np.testing.assert_array_equal(out["tokens"][0, :len(want)], want)
  assert out["tokens"].min() >= 0


def test_an_id_outside_the_vocabulary_is_an_error():
  class Small(ByteTokenizer):
    vocab_size = 100  # bytes + 3 reach past it for any letter
  ex = {"prompt": "a", "responses": ["b"], "ratings": [1.0]}
  with pytest.raises(ValueError, match=r"token id \d+ is outside the tokenizer's vocabulary "
                                       r"\[0, 100\)"):
    data.encode_example(ex, Small(), max_len=8, num_responses=1)


def test_warmup_ratio_zero_means_lr_above_zero_at_step_zero():
  oc = ml_collections.ConfigDict(dict(warmup_ratio=0.0, lr=1e-2, min_lr_ratio=0.1, grad_clip=1.0,
                                      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
  tx, schedule = optim.make_optimizer(oc, 10)
  assert float(schedule(0)) == pytest.approx(1e-2)
  params = {"w": np.ones((2, 2), np.float32)}
  updates, _ = tx.update({"w": np.ones((2, 2), np.float32)}, tx.init(params), params)
  assert np.abs(np.asarray(updates["w"])).min() > 0  # the first update moves the weights
  oc.warmup_ratio = 0.2  # a real warmup still starts at 0 and peaks after 2 steps
  _, schedule = optim.make_optimizer(oc, 10)
  assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(1e-2)
