"""Tokenizer loading: byte, SentencePiece file/dir, tokenizer.json dir, Hugging Face hub ids."""

import json
import shutil

import pytest

from stable_alignment_jax.data import tokenizer as tok_lib


def test_byte_round_trip_and_specials():
  tok = tok_lib.load_tokenizer("byte")
  text = "héllo, wörld ✓"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(text.encode()) + 2
  assert tok.decode(ids) == text
  assert tok.add_bos and tok.stop_ids == [tok.eos_id] and tok.chat_template is None


def test_sentencepiece_file_and_directory_match_the_library(shared_data, tmp_path):
  import sentencepiece as spm
  model = shared_data / "tokenizers" / "llama2_tokenizer.model"
  ref = spm.SentencePieceProcessor(model_file=str(model))
  shutil.copy(model, tmp_path / "tokenizer.model")
  text = "Is it ever okay to lie to protect a friend?"
  for tok in (tok_lib.load_tokenizer(str(model)), tok_lib.load_tokenizer(str(tmp_path))):
    assert tok.encode(text) == ref.encode(text) and tok.vocab_size == 32000
    assert tok.decode(tok.encode(text, bos=True)) == text
    assert tok.add_bos and tok.stop_ids == [2] and tok.chat_template is None  # LLaMA-2: <s>, </s>


def _tokenizer_json_dir(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE(unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.ByteLevel()
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(["be kind to others", "honest and helpful answers"] * 20,
                        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
  path.mkdir()
  t.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  return t


def test_tokenizer_json_directory(tmp_path):
  ref = _tokenizer_json_dir(tmp_path / "hf")
  tok = tok_lib.load_tokenizer(str(tmp_path / "hf"))
  ids = tok.encode("be kind", bos=True, eos=True)
  assert ids == [ref.token_to_id("<s>"), *ref.encode("be kind").ids, ref.token_to_id("</s>")]


def test_hub_id_resolves_through_snapshot_download(tmp_path, monkeypatch):
  _tokenizer_json_dir(tmp_path / "snap")
  asked = []

  def fake_download(repo_id, allow_patterns):
    asked.append((repo_id, tuple(allow_patterns)))
    return str(tmp_path / "snap")
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  tok = tok_lib.load_tokenizer("some-org/some-model")
  assert asked == [("some-org/some-model", tuple(tok_lib._TOKENIZER_FILES))]  # no weights fetched
  assert {"generation_config.json", "chat_template.jinja"} <= set(asked[0][1])  # stops, template
  assert tok.decode(tok.encode("be kind")).strip() == "be kind"


def test_missing_tokenizers_are_clear_errors(tmp_path, monkeypatch):
  import huggingface_hub

  def offline(repo_id, allow_patterns):
    raise OSError("no network")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="'meta-llama/Llama-2-7b-hf'.*hub could not"):
    tok_lib.load_tokenizer("meta-llama/Llama-2-7b-hf")
  with pytest.raises(FileNotFoundError, match="tokenizer not found"):
    tok_lib.load_tokenizer(str(tmp_path / "nothing.model"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    tok_lib.load_tokenizer(str(tmp_path / "empty"))


def test_bos_policy_of_a_tokenizer_json_follows_its_post_processor(tmp_path):
  from tokenizers import processors
  t = _tokenizer_json_dir(tmp_path / "plain")
  assert not tok_lib.load_tokenizer(str(tmp_path / "plain")).add_bos  # adds nothing (SmolLM2)
  bos = t.token_to_id("<s>")
  t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
  (tmp_path / "bos").mkdir()
  t.save(str(tmp_path / "bos" / "tokenizer.json"))  # adds BOS itself (LLaMA-3)
  shutil.copy(tmp_path / "plain" / "tokenizer_config.json", tmp_path / "bos")
  tok = tok_lib.load_tokenizer(str(tmp_path / "bos"))
  assert tok.add_bos and tok.bos_text == "<s>"
  assert tok.encode("be kind")[0] != bos  # encode itself adds BOS only when asked
