"""Training rows and stop ids per chat family: a response ends with the token the template ends an
assistant turn with (ChatML's <|im_end|> on a Qwen *base* tokenizer whose EOS is <|endoftext|>,
Gemma's <end_of_turn>, Llama 3's <|eot_id|>), never with that and EOS both; the loss mask covers
the response and that token; BOS appears once where the tokenizer has one (Gemma, Llama 3) and
never as -1 where it has none (Qwen). Checked against transformers' own apply_chat_template on
small tokenizers built here with each family's special tokens and template layout."""

import json

import numpy as np
import pytest
import transformers

from stable_alignment_jax.data import loader as data
from stable_alignment_jax.data.prompt_format import PromptFormat
from stable_alignment_jax.data.tokenizer import load_tokenizer

# The families' template layouts (written here after their published formats).
QWEN = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}"
         "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")

# family -> (special tokens, tokenizer_config fields, template, generation_config eos names,
#            the turn's end token)
FAMILIES = {
    "qwen_base": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                       add_bos_token=False), QWEN, ["<|endoftext|>"], "<|im_end|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True),
              GEMMA, ["<eos>", "<end_of_turn>"], "<end_of_turn>"),
    "llama3_base": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>"],
                    dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                         add_bos_token=True), LLAMA3, ["<|end_of_text|>"], "<|eot_id|>"),
}


def _tokenizer_dir(path, family):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  special, config, template, gen_eos, _ = FAMILIES[family]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["Is it fine to lie to a friend? No, honesty matters.", "user assistant model system"]
  tok.train_from_iterator(corpus * 20, trainer)
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **config}))
  (path / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}))
  return str(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_end_with_the_templates_turn_end_only(family, tmp_path):
  path = _tokenizer_dir(tmp_path / family, family)
  tok = load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  end = hf.convert_tokens_to_ids(FAMILIES[family][4])
  eos = hf.convert_tokens_to_ids(FAMILIES[family][1]["eos_token"])
  assert end != eos
  # Stopping knows both: generation_config's EOS ids and the template's end of turn.
  assert {end, eos} <= set(tok.stop_ids)
  assert PromptFormat(tok, "chat_template").end == [end]

  turns = ["Is it fine to lie?"]
  ex = {"prompt": turns[0], "responses": ["No, honesty matters."], "ratings": [6.0],
        "turns": turns}
  out = data.encode_example(ex, tok, max_len=96, num_responses=1,
                            prompt_format="chat_template")
  msgs = [{"role": "user", "content": turns[0]}]
  prompt = list(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])
  full = list(hf.apply_chat_template(msgs + [{"role": "assistant", "content": ex["responses"][0]}],
                                     tokenize=True, return_dict=True)["input_ids"])
  n = full.index(end, len(prompt)) + 1  # through the response's end-of-turn token
  row = out["tokens"][0]
  np.testing.assert_array_equal(row[:n], full[:n])
  mask = np.zeros(96)
  mask[len(prompt):n] = 1
  np.testing.assert_array_equal(out["loss_mask"][0], mask)
  trained = row[out["loss_mask"][0] > 0]
  assert trained[-1] == end and eos not in trained.tolist()  # never both
  bos = tok.bos_id
  if family == "qwen_base":  # no BOS token: none written, and never a -1 id
    assert bos < 0 and row.min() >= 0 and row[0] == hf.convert_tokens_to_ids("<|im_start|>")
  else:  # one BOS, from the template (not doubled by the tokenizer's add_bos)
    assert row[0] == bos and row[1] != bos
