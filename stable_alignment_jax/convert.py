"""Hugging Face checkpoints in and out of run directories, the one checkpoint format we write.

  python -m stable_alignment_jax.convert --from_hf=HF_DIR_OR_HUB_ID --to=RUN_DIR
  python -m stable_alignment_jax.convert --from=RUN_DIR --to_hf=HF_DIR [--tokenizer=PATH]
  python -m stable_alignment_jax.convert --from=LORA_RUN_DIR --to_peft=ADAPTER_DIR

The import writes what a training run leaves (`checkpoints.save_model`), so `load_model`,
`checkpoint.init_from`, serve, SANDBOX and eval read it; tokenizer files, chat template and
generation config are copied into it. The export takes any run directory, a training run's
included; a LoRA run is written merged (its base + the adapters' delta). --to_peft writes a
LoRA run's adapters in PEFT's format (adapter_config.json + adapter_model.safetensors, for
`peft.PeftModel.from_pretrained(<its HF base>, DIR)`). The weight layouts themselves are
`model/convert.py`'s and `model/peft.py`'s.
"""

import os
import sys

from absl import app, flags
from flax import nnx


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  src = f["from"].value
  if not ((f.from_hf and f.to) or (src and (f.to_hf or f.to_peft))):
    raise app.UsageError("give --from_hf DIR --to DIR (import), --from DIR --to_hf DIR (export) "
                         "or --from LORA_RUN --to_peft DIR (adapters)")
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  from stable_alignment_jax.model import convert
  try:
    if f.from_hf:
      path = checkpoints.resolve(f.from_hf)
      recorded = convert.checkpoint_dtype(convert.read_hf_json(path)[0]) \
          if os.path.isdir(path) else None
      graphdef, state = checkpoints.load_hf(path, dtype=recorded or "float32",
                                            param_dtype=f.param_dtype)
      cfg = nnx.merge(graphdef, state).cfg
      out = os.path.abspath(os.path.expanduser(f.to))
      os.makedirs(out, exist_ok=True)
      copied = convert.copy_tokenizer_files(f.tokenizer or path, out)
      has_tokenizer = any(x in copied for x in ("tokenizer.json", "tokenizer.model"))
      checkpoints.save_model(cfg, state, out, tokenizer=out if has_tokenizer else "",
                             source=f.from_hf)
      print(f"wrote run directory {out}: {cfg.num_params():,} parameters, dtype {cfg.dtype} "
            f"recorded (the checkpoint's; checkpoints.compute_dtype decides at load); side "
            f"files {copied}")
    elif f.to_peft:
      out = checkpoints.export_peft(src, f.to_peft)
      print(f"wrote PEFT adapter {out}")
    if src and f.to_hf:
      files = checkpoints.export_hf(src, f.to_hf, tokenizer=f.tokenizer, dtype=f.hf_dtype,
                                    max_shard_bytes=f.max_shard_bytes)
      print(f"wrote {f.to_hf}: {len(files)} safetensors file(s)")
  except (convert.CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    sys.exit(f"convert: error: {e.args[0] if e.args else e}")


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import."""
  flags.DEFINE_string("from_hf", None, "HF LLaMA directory (or hub id) to import")
  flags.DEFINE_string("to", None, "run directory to write (with --from_hf)")
  flags.DEFINE_string("from", None, "run directory to export (a training run's or an import's)")
  flags.DEFINE_string("to_hf", None, "HF directory to write (with --from; a LoRA run merged)")
  flags.DEFINE_string("to_peft", None, "PEFT adapter directory to write (with --from, a LoRA run)")
  flags.DEFINE_string("param_dtype", "float32", "weights dtype after import")
  flags.DEFINE_string("hf_dtype", None, "tensor dtype written to the HF directory")
  flags.DEFINE_string("tokenizer", None, "tokenizer file/dir copied along")
  flags.DEFINE_integer("max_shard_bytes", 2 << 30, "largest safetensors file written")
  app.run(main)


if __name__ == "__main__":
  cli()
