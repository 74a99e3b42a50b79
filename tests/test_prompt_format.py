"""data.prompt_format: training prompts in the checkpoint's chat format.

The chat rows are checked against transformers' own `apply_chat_template` (prompt with the
generation prompt; prompt + response through the end-of-turn token), on a small ChatML
tokenizer built here and on the real SmolLM2 tokenizer when its GGUF is present; the loss mask
covers exactly the response and the end-of-turn token. Alpaca rows stay as they were."""

import json

import numpy as np
import pytest
import transformers

from data_prep import alignment_examples as ax
from data_prep import build as build_lib
from stable_alignment_jax.data import loader as data
from stable_alignment_jax.data.tokenizer import ByteTokenizer, load_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _chatml_dir(path):
  """A byte-level BPE tokenizer (tokenizers) trained on a few lines, with the ChatML template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["Is it fine to lie to a friend? No, honesty matters.", "Question: Answer: Critique",
            "the answer below to the given question is socially aligned", "user assistant system"]
  tok.train_from_iterator(corpus * 20, trainer)
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
  return str(path)


@pytest.fixture(params=["chatml", "smollm2"])
def chat_dir(request, tmp_path):
  if request.param == "chatml":
    return _chatml_dir(tmp_path / "chatml")
  return str(request.getfixturevalue("smollm2_dir"))


def _ids(out):
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def _example(turns, responses, ratings):
  return {"prompt": ax.alpaca_prompt(turns[-1]), "responses": responses, "ratings": ratings,
          "turns": turns}


def test_chat_rows_match_transformers_apply_chat_template(chat_dir):
  tok = load_tokenizer(chat_dir)
  hf = transformers.AutoTokenizer.from_pretrained(chat_dir)
  turns = ["Is it fine to lie?", "Rarely.", ax.user_turn(ax.CRITIQUE_INSTRUCTION,
                                                         "Question: Why?\nAnswer: Because.")]
  ex = _example(turns, ["No, honesty matters.", "Sure, lie."], [6.0, 2.0])
  out = data.encode_example(ex, tok, max_len=256, num_responses=3,
                            prompt_format="chat_template")
  msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
          for i, t in enumerate(turns)]
  prompt = _ids(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
  end = hf.convert_tokens_to_ids("<|im_end|>")
  for k, resp in enumerate(ex["responses"]):
    full = _ids(hf.apply_chat_template(msgs + [{"role": "assistant", "content": resp}],
                                       tokenize=True))
    n = full.index(end, len(prompt)) + 1  # through the response's end-of-turn token
    assert full[:len(prompt)] == prompt
    np.testing.assert_array_equal(out["tokens"][k, :n], full[:n])
    assert out["tokens"][k, n - 1] == end
    mask = np.zeros(256)
    mask[len(prompt):n] = 1
    np.testing.assert_array_equal(out["loss_mask"][k], mask)
    assert (out["tokens"][k, n:] == tok.pad_id).all()
  assert out["response_mask"].tolist() == [1, 1, 0] and not out["loss_mask"][2].any()


def test_auto_resolution_and_old_examples(tmp_path):
  chat = load_tokenizer(_chatml_dir(tmp_path / "t"))
  new = _example(["Hi?"], ["Hello."], [5.0])
  old = {k: new[k] for k in ("prompt", "responses", "ratings")}
  assert data.resolve_prompt_format("auto", chat, new) == "chat_template"
  assert data.resolve_prompt_format("auto", chat, old) == "alpaca"
  assert data.resolve_prompt_format("auto", ByteTokenizer(), new) == "alpaca"
  with pytest.raises(ValueError, match="prompt_format='x'"):
    data.resolve_prompt_format("x", chat, new)
  with pytest.raises(ValueError, match="has no `turns`.*data.prompt_format=alpaca"):
    data.encode_example(old, chat, max_len=64, num_responses=1, prompt_format="chat_template")
  with pytest.raises(ValueError, match="prompt_format=chat_template: tokenizer 'byte' has no"):
    data.PromptFormat(ByteTokenizer(), "chat_template")
  # Alpaca rows are BOS when the tokenizer adds one (this one does not), then the stored prompt
  # and the response tokenised as one text, then EOS.
  out = data.encode_example(new, chat, max_len=256, num_responses=1, prompt_format="alpaca")
  assert not chat.add_bos
  want = chat.encode(new["prompt"] + "Hello.") + [chat.eos_id]
  np.testing.assert_array_equal(out["tokens"][0, :len(want)], want)
  # An HH dialogue without a chat form (empty turns) is dropped and counted, not rendered.
  hh = _example(["x"], ["a"], [1.0])
  hh["turns"] = []
  loader = data.make_loader([new] * 4 + [hh], chat, global_batch_size=2, max_len=96,
                            num_responses=1, seed=0, shard_index=0, shard_count=1)
  assert loader.stats["prompt_format"] == "chat_template"
  assert loader.stats["dropped"] == {data.DROP_NO_CHAT_TURNS: 1}
  batch = next(iter(loader))
  ref = data.encode_example(new, chat, max_len=96, num_responses=1,
                            prompt_format="chat_template")
  np.testing.assert_array_equal(batch["tokens"][0], ref["tokens"])


def test_data_prep_datasets_carry_turns_for_both_formats(tmp_path):
  rec = {"run_id": "r", "round": 0, "agent": 0, "agent_model": "m", "question": "Why lie?",
         "draft": {"text": "To win.", "moral": 2.0, "engagement": 3.0},
         "feedback": [{"peer": 1, "rating": 2, "rating_source": "choice",
                       "rating_probs": [0.1, 0.6, 0.1, 0.1, 0.05, 0.03, 0.02],
                       "rating_expected": 2.57, "reason": "Dishonest."},
                      {"peer": 2, "rating": None, "rating_source": "text", "reason": "??"}],
         "revised": {"text": "Do not lie.", "moral": 6.0, "moral_source": "choice",
                     "engagement": None}}
  path = tmp_path / "e.jsonl"
  path.write_text(json.dumps(rec) + "\n")
  card = build_lib.build([str(path)], str(tmp_path / "out"), validation_percent=0)
  assert card["scores_by_source"] == {
      "rating": {"text": 0, "choice": 1, "null": 1},
      "moral": {"text": 1, "choice": 1, "null": 0},  # no source field: read as text
      "engagement": {"text": 1, "choice": 0, "null": 1}}
  for kind, turn in (("imitation", "Why lie?"),
                     ("self_critic", ax.user_turn(ax.CRITIQUE_INSTRUCTION,
                                                  "Question: Why lie?\nAnswer: To win.")),
                     # the authors' one instruction: question, draft, request
                     ("realignment", ax.user_turn(ax.revise_request("Why lie?", "To win.")))):
    (ex,) = data.open_tfds(f"sandbox_alignment/{kind}", str(tmp_path / "out"), "train")
    assert ex["turns"] == [turn]
    # The Alpaca prompt holds exactly the same words around its headers.
    instruction, _, input_text = turn.partition("\n\n")
    assert ex["prompt"] == ax.alpaca_prompt(instruction, input_text or None)
