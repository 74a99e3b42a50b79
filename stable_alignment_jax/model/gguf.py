"""A GGUF file (llama.cpp's format) -> a Hugging Face directory the rest of the project reads.

transformers reads GGUF itself (dequantizing to float and undoing llama.cpp's q/k layout); this
module only rebuilds a plain `LlamaForCausalLM` from the file's config, because a model loaded
with `gguf_file=` refuses `save_pretrained`, and saves it with the tokenizer, its chat template
and a generation config. transformers' GGUF reader needs torch (a test dependency here, not a
runtime one): install it to convert (`pip install torch`, the CPU build is enough).

  python -m stable_alignment_jax.model.gguf --gguf=FILE.gguf --to_hf=DIR
"""

import os
import sys

from absl import app, flags


def to_hf(gguf: str, out: str) -> str:
  """Writes the dequantized model (f32 safetensors), tokenizer and chat template into `out`."""
  if not os.path.isfile(gguf):
    raise FileNotFoundError(f"{gguf}: no such GGUF file")
  try:
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  except ImportError as e:
    raise ImportError(f"converting {gguf} needs torch and gguf ({e}); "
                      "pip install torch gguf") from None
  directory, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
  config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
  for key in ("quantization_config", "_name_or_path"):
    config.__dict__.pop(key, None)
  if config.model_type not in ("llama", "mistral"):
    raise ValueError(f"{gguf}: model type {config.model_type!r} is not a LLaMA-family model")
  config.architectures = ["LlamaForCausalLM"]
  model = transformers.LlamaForCausalLM(config).eval()
  tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model)["tensors"]
  missing, unexpected = model.load_state_dict(
      {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, strict=False)
  # A tied model's GGUF holds no separate head; everything else must be there.
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise ValueError(f"{gguf}: tensors do not fit LlamaForCausalLM: missing {missing}, "
                     f"unexpected {unexpected}")
  if config.tie_word_embeddings:
    model.tie_weights()
  model.save_pretrained(out)
  transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
  model.generation_config.save_pretrained(out)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  f = flags.FLAGS
  if not f.gguf or not f.to_hf:
    raise app.UsageError("give --gguf=FILE.gguf --to_hf=DIR", exitcode=2)
  try:
    to_hf(f.gguf, f.to_hf)
  except (OSError, ValueError, ImportError) as e:
    print(f"gguf: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {f.to_hf}")
  return 0


def cli():
  """The command line. Flags are defined here, not at import."""
  flags.DEFINE_string("gguf", None, "the .gguf file")
  flags.DEFINE_string("to_hf", None, "the Hugging Face directory to write")
  app.run(main)


if __name__ == "__main__":
  cli()
