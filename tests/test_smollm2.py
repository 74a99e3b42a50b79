"""The real SmolLM2-135M-Instruct (tied head, 30 layers, GQA 9/3, theta 1e5) read from its HF
directory computes what `transformers` computes: logits on real text, greedy chat completions
token for token, and an HF -> ours -> HF round trip that transformers serves identically."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from stable_alignment_jax.sampling import generate
from stable_alignment_jax.model import convert

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built for "
        "the 1889 World's Fair, and for the Louvre, the world's most visited museum.")
CHATS = ["What is the capital of France?", "Name three primary colours.",
         "Write one sentence about the sea.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
  # One torch thread: on a few shared cores, torch's thread pool makes decoding ~4x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield (transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
         .eval(), transformers.AutoTokenizer.from_pretrained(smollm2_dir))
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
  return convert.load_hf(str(smollm2_dir), dtype="float32")


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def test_import_reads_the_real_config(ours):
  cfg = nnx.merge(*ours).cfg
  assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
          cfg.ffn_dim) == (49152, 576, 30, 9, 3, 64, 1536)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and "lm_head" not in ours[1]


def test_logits_on_real_text_match_transformers(hf, ours):
  model, tok = hf
  ids = [tok(TEXT)["input_ids"]]
  ref = _hf_logits(model, ids)
  got = np.asarray(nnx.merge(*ours)(jnp.asarray(ids))[0])
  scale = np.abs(ref).max()
  assert scale > 5 and np.abs(got - ref).max() <= 1e-5 * scale, np.abs(got - ref).max() / scale


def _chat_ids(tok):
  return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"] for q in CHATS]


def test_greedy_chat_completions_match_hf_generate(hf, ours):
  model, tok = hf
  prompts = _chat_ids(tok)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  eos = sorted({end, tok.eos_token_id})
  sampler = generate.Sampler(*ours, eos_id=eos, pad_id=tok.pad_token_id or 0)
  got = sampler.generate(prompts, generate.SamplingParams(max_new_tokens=32))
  for prompt, new in zip(prompts, got):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                           dtype=torch.long), max_new_tokens=32, do_sample=False,
                           eos_token_id=eos, pad_token_id=tok.pad_token_id)
    want = out[0, len(prompt):].tolist()
    assert new == want, (tok.decode(new), tok.decode(want))
  assert any(new[-1] == end for new in got)  # a chat model ends its turn within 32 tokens
  assert "Paris" in tok.decode(got[0])


def test_round_trip_hf_ours_hf_serves_the_same_model(smollm2_dir, hf, ours, tmp_path):
  model, tok = hf
  out = tmp_path / "out"
  files = convert.save_hf(*ours, str(out), tokenizer=str(smollm2_dir))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_theta"] == 1e5
  names = set()
  for f in files:
    with safe_open(str(out / f), framework="numpy") as fh:
      names |= set(fh.keys())
  assert "lm_head.weight" not in names and len(names) == 2 + 9 * 30
  size = sum(os.path.getsize(out / f) for f in files)
  assert abs(size - 134_515_008 * 4) < 1e6  # f32, the embedding written once (~514 MiB)
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
  back_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert _chat_ids(back_tok) == _chat_ids(tok)  # the chat template came along
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert back.config.tie_word_embeddings
  ids = [tok(TEXT)["input_ids"]]
  np.testing.assert_array_equal(_hf_logits(back, ids), _hf_logits(model, ids))
