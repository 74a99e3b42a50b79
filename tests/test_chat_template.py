"""Chat templates as the checkpoint ships them (chat_template.jinja or tokenizer_config.json),
rendered by transformers; stop ids from generation_config.json and the template's end of turn;
the hand-written Alpaca layout as an explicit choice and as the fallback."""

import json

import pytest
import transformers

from stable_alignment_jax.sampling.text_sampler import ModelTemplate, resolve_template
from stable_alignment_jax.data.tokenizer import load_tokenizer

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
MSGS = [{"role": "user", "content": "be kind"}, {"role": "assistant", "content": "honest"},
        {"role": "user", "content": "and helpful?"}]


def _tok_dir(path, *, template_file=None, config_template=None, generation=None):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE(unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(["be kind to others", "honest and helpful answers"] * 20,
                        trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
  path.mkdir()
  t.save(str(path / "tokenizer.json"))
  cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}
  if config_template is not None:
    cfg["chat_template"] = config_template
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  if template_file is not None:
    (path / "chat_template.jinja").write_text(template_file)
  if generation is not None:
    (path / "generation_config.json").write_text(json.dumps(generation))
  return t


def _reference(path, messages, **kw):
  return transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
      messages, tokenize=False, **kw)


@pytest.mark.parametrize("where", ["jinja_file", "tokenizer_config"])
def test_template_read_from_either_place_renders_as_transformers(tmp_path, where):
  path = tmp_path / where
  kw = {"template_file": LLAMA3} if where == "jinja_file" else {"config_template": LLAMA3}
  t = _tok_dir(path, **kw)
  tok = load_tokenizer(str(path))
  assert tok.chat_template == LLAMA3
  template = resolve_template("auto", tok)
  assert isinstance(template, ModelTemplate)
  assert template.render(MSGS) == _reference(path, MSGS, add_generation_prompt=True)
  # A last assistant message is continued, as continue_final_message does.
  partial = MSGS[:2]
  assert template.render(partial) == _reference(path, partial, continue_final_message=True)
  # End of turn: <|eot_id|>, a single special token, joins the tokenizer's EOS.
  assert tok.stop_ids == sorted({t.token_to_id("<|end_of_text|>"), t.token_to_id("<|eot_id|>")})


def test_stop_ids_from_a_generation_config_list(tmp_path):
  t = _tok_dir(tmp_path / "d", generation={"eos_token_id": [7, 9], "bos_token_id": 1})
  tok = load_tokenizer(str(tmp_path / "d"))
  assert tok.chat_template is None
  assert tok.stop_ids == sorted({7, 9, t.token_to_id("<|end_of_text|>")})
  (tmp_path / "d" / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
  assert load_tokenizer(str(tmp_path / "d")).stop_ids == sorted({11, tok.eos_id})


def test_alpaca_stays_an_explicit_choice_and_the_fallback(tmp_path):
  _tok_dir(tmp_path / "d", template_file=LLAMA3)
  tok = load_tokenizer(str(tmp_path / "d"))
  preamble = ("Below is an instruction that describes a task. "
              "Write a response that appropriately completes the request.")
  want = f"{preamble}\n\n### Instruction:\nhi\n\n### Response:\n"  # laid out by hand
  msgs = [{"role": "user", "content": "hi"}]
  assert resolve_template("alpaca", tok).render(msgs) == want
  assert resolve_template("alpaca", tok).stop == ("### Instruction:",)
  byte = load_tokenizer("byte")  # no template of its own
  assert resolve_template("auto", byte).render(msgs) == want
  with pytest.raises(ValueError, match="chat_template='model'.*no chat template"):
    resolve_template("model", byte)
  with pytest.raises(KeyError, match="unknown chat template 'nope'"):
    resolve_template("nope", tok)


def test_messages_are_checked_before_the_model_template(tmp_path):
  _tok_dir(tmp_path / "d", template_file=LLAMA3)
  template = resolve_template("model", load_tokenizer(str(tmp_path / "d")))
  with pytest.raises(ValueError, match=r"messages\[0\].role: unsupported role 'tool'"):
    template.render([{"role": "tool", "content": "x"}])
  parts = [{"role": "user", "content": [{"type": "text", "text": "be "},
                                        {"type": "text", "text": "kind"}]}]
  assert template.render(parts) == template.render([{"role": "user", "content": "be kind"}])
