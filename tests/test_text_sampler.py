"""TextSampler against independent computations: the raw Sampler on hand-encoded ids, the model's
own logits, and transformers' `apply_chat_template` on a small HF directory."""

import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import hf_models
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.model.llama import Llama
from stable_alignment_jax.model.presets import preset
from stable_alignment_jax.sampling.text_sampler import TextSampler
from stable_alignment_jax.data.tokenizer import load_tokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny():
  tok = load_tokenizer("byte")
  # The byte tokenizer's vocabulary, so every sampled id is text (stop strings can be found).
  model = Llama(preset("tiny", vocab_size=tok.vocab_size, dtype="float32"), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ts = TextSampler(graphdef, state, tok)
  ref = Sampler(graphdef, state, eos_id=tok.eos_id, pad_id=tok.pad_id)
  return ts, ref, tok, model


def _decoded(tok, ids):
  body = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
  return tok.decode([i for i in body if i < tok.vocab_size])


def test_complete_equals_the_raw_sampler_decoded(tiny):
  ts, ref, tok, _ = tiny
  prompts = ["Hello there", "A longer prompt about kindness"]
  params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=1.0,
                                                              seed=3)]
  got = ts.complete(prompts, params)
  want = ref.generate([tok.encode(p, bos=True) for p in prompts], params)
  assert [c.text for c in got] == [_decoded(tok, w) for w in want]
  assert [c.token_ids for c in got] == want
  assert [c.prompt_tokens for c in got] == [len(p.encode()) + 1 for p in prompts]
  assert all(c.finish_reason == ("stop" if w[-1] == tok.eos_id else "length")
             for c, w in zip(got, want))
  assert not any(c.truncated for c in got)


def test_too_long_prompt_keeps_its_end_and_bos(tiny):
  ts, ref, tok, _ = tiny
  short = TextSampler(ts.sampler.graphdef, ts.sampler.state, tok, max_prompt_tokens=16)
  text = "".join(chr(ord("a") + i % 26) for i in range(40))
  c = short.complete([text], SamplingParams(max_new_tokens=4))[0]
  ids = [tok.bos_id] + [b + 3 for b in text[-15:].encode()]  # BOS + the last 15 bytes
  assert c.truncated and c.prompt_tokens == 16
  assert c.token_ids == ref.generate([ids], SamplingParams(max_new_tokens=4))[0]
  # The context of 512: 100 new tokens pad to 128, leaving 384, of which a power of two: 256.
  assert ts.context == 512 and ts.prompt_budget(100) == 256 and ts.prompt_budget(None) == 512
  assert ts.prompt_budget(0) == 256  # the sampler keeps one new-token slot, padded to 1
  with pytest.raises(ValueError, match="leaves no room"):
    ts.prompt_budget(300)  # pads to 512: nothing left


def test_stop_strings_cut_the_text(tiny):
  ts, _, _, _ = tiny
  full = ts.complete(["Stop here"], SamplingParams(max_new_tokens=16))[0]
  stop = next(full.text[i:i + 2] for i in range(1, len(full.text) - 1)
              if "\ufffd" not in full.text[i:i + 2])
  c = ts.complete(["Stop here"], SamplingParams(max_new_tokens=16), stop=[stop])[0]
  assert c.text == full.text[:full.text.find(stop)] and c.finish_reason == "stop"
  assert c.token_ids == full.token_ids[:len(c.token_ids)]
  assert stop in ts.decode(c.token_ids) and stop not in ts.decode(c.token_ids[:-1])


def test_stream_deltas_add_up_to_complete_and_hold_back_a_stop_string(tiny):
  ts, _, _, _ = tiny
  prompts, sp = ["Stream me", "And me too"], SamplingParams(max_new_tokens=32)
  whole = ts.complete(prompts, sp)
  text = whole[0].text  # a stop string from the middle of row 0's text ends that row there
  stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
              if "\ufffd" not in text[i:i + 2])
  want = ts.complete(prompts, sp, stop=[[stop], []])
  steps = list(ts.stream(prompts, sp, stop=[[stop], []], chunk=4))
  assert len(steps) > 2
  for i in range(2):
    deltas = [step[i] for step in steps]
    assert "".join(d.text for d in deltas) == want[i].text
    assert [d.done for d in deltas if d.done] == [want[i]]
  assert want[0].text == text[:text.find(stop)] and want[0].finish_reason == "stop"
  sent = ""
  for step in steps:  # row 0 never sent the stop string, not even in passing
    sent += step[0].text
    assert stop not in sent


def test_choice_logprobs_equal_the_models_next_token_log_softmax(tiny):
  ts, _, tok, model = tiny
  prompts = ["Rate it. Rating:", "Another one, much longer. Rating:"]
  choices = [str(k) for k in range(1, 8)]
  got = ts.choice_logprobs(prompts, choices)
  for i, p in enumerate(prompts):
    ids = tok.encode(p, bos=True)  # one unpadded row: no mask, no shared batch
    logits, _ = model(np.asarray([ids], np.int32))
    want = np.asarray(jax.nn.log_softmax(logits[0, -1]))[[b + 3 for b in "1234567".encode()]]
    np.testing.assert_allclose(got[i], want, atol=1e-4)
  with pytest.raises(ValueError, match="'12' is not a single token"):
    ts.choice_logprobs(prompts, ["1", "12"])


# -- a small HF directory: random LLaMA weights, a BPE tokenizer.json, a ChatML template --------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  path = tmp_path_factory.mktemp("chatml")
  hf_models.build("llama3_1", path)
  t = Tokenizer(models.BPE(unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(["be kind to others", "honest and helpful answers", "user assistant"] * 20,
                        trainers.BpeTrainer(vocab_size=280, special_tokens=[
                            "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
  t.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
  (path / "chat_template.jinja").write_text(CHATML)
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
  return path


def test_hf_dir_chat_rendering_stop_ids_and_bos_policy(hf_dir):
  ts = TextSampler.load(str(hf_dir), dtype="float32")
  tok = ts.tokenizer
  msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "honest?"}]
  want = transformers.AutoTokenizer.from_pretrained(str(hf_dir)).apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=True)
  assert ts.render(msgs) == want
  assert not tok.add_bos  # the post-processor adds nothing, and tokenizer_config does not ask
  im_start, im_end = tok.tok.token_to_id("<|im_start|>"), tok.tok.token_to_id("<|im_end|>")
  assert ts.prompt_ids(msgs)[0] == im_start  # no BOS in front
  assert ts.stop_ids == sorted({2, 4, im_end})  # eos, generation_config list, end of turn
  # Generation: the same as the raw sampler on transformers' own token ids for that text.
  ids = transformers.AutoTokenizer.from_pretrained(str(hf_dir))(want, add_special_tokens=False)
  ids = ids["input_ids"]
  ref = Sampler(ts.sampler.graphdef, ts.sampler.state, eos_id=ts.stop_ids, pad_id=tok.pad_id)
  c = ts.complete([msgs], SamplingParams(max_new_tokens=8))[0]
  assert c.prompt_tokens == len(ids)
  assert c.token_ids == ref.generate([ids], SamplingParams(max_new_tokens=8))[0]


def test_bos_policy_follows_the_tokenizer_config_and_is_never_doubled(hf_dir, tmp_path):
  import shutil
  for name in ("tokenizer.json", "chat_template.jinja"):
    shutil.copy(hf_dir / name, tmp_path / name)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.add_bos and tok.bos_id == 1
  ts = TextSampler.__new__(TextSampler)  # encoding needs no model
  ts.tokenizer = tok
  assert ts.encode("be kind")[:1] == [1]
  assert ts.encode("<s>be kind") == ts.encode("be kind")  # a template's own BOS: just one


def test_a_bf16_cache_is_passed_through_and_tracks_the_f32_cache():
  from stable_alignment_jax.serving.engine import load_engine
  f32 = TextSampler.load("random:tiny")
  bf16 = load_engine("random:tiny", cache_dtype="bfloat16", model_name="m").sampler
  assert bf16.sampler.cache_dtype == "bfloat16" and f32.sampler.cache_dtype is None
  params = SamplingParams(max_new_tokens=24)
  a = f32.complete(["a question", "another one, longer"], params)
  b = bf16.complete(["a question", "another one, longer"], params)
  # Greedy on random weights: the 16-bit cache may flip a near-tie late, not the first tokens.
  for x, y in zip(a, b):
    assert x.token_ids[:8] == y.token_ids[:8]
