"""Peak host memory and step time of training SmolLM2-135M: full fine-tuning, LoRA and QLoRA.

Each variant is the real trainer (`train.run`, the Stage 1 loss on the embedded synthetic data,
from the HF directory) in a child process of its own, at the same batch and micro-batching;
its peak RSS is the child's own `ru_maxrss` (os.wait4 on that child, so no other process or
variant counts), which covers loading the model, compiling and training. Step time is the
median over the steps after `--warmup` (the trainer's metrics.jsonl, logged every step: the
wall time per step incl. feeding it, as a run sees it). The load average is printed beside the
figures: this host is shared, so time figures are only as good as that.

  python -m stable_alignment_jax.model.gguf \\
      --gguf=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --to_hf=/tmp/smol_hf   # once
  python benchmarks/lora_memory.py --hf=/tmp/smol_hf [--batch 2 --responses 2 --seq 64]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from benchmarks import common  # noqa: E402

# name -> config overrides on top of the shared ones
VARIANTS = {
    "full": {},
    "LoRA r=16": {"lora.rank": 16},
    "QLoRA nf4 r=16": {"lora.rank": 16, "lora.quantize": "nf4"},
}


def child(args) -> None:
  """One variant: trains, then writes {"step_s": [...], "summary": ...} to args.out."""
  common.one_cpu_device()  # before jax is imported
  from configs import stage1
  from stable_alignment_jax.training import train
  c = stage1.get_config("tiny")
  with c.unlocked():
    c.checkpoint.init_from = args.hf
    c.checkpoint.dir = os.path.join(args.workdir, "run")
    c.checkpoint.save_every = 10**6
    c.model.dtype = c.model.param_dtype = "float32"  # CPU: f32 compute (bf16 is emulated)
    c.data.batch_size, c.data.num_responses, c.data.max_len = (args.batch, args.responses,
                                                               args.seq)
    c.data.truncation, c.data.accept_length_loss = "cut", True
    c.optim.accum_steps = 1  # equal micro-batching for every variant
    c.train.steps = args.warmup + args.steps
    c.train.log_every, c.train.eval_every = 1, 10**6
    for key, value in json.loads(args.overrides).items():
      node = c
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  train.run(c)
  steps = []
  with open(os.path.join(c.checkpoint.dir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "train" and r["step"] > args.warmup:
        steps.append(args.batch * args.responses * args.seq / r["tokens_per_s"])
  with open(args.out, "w") as f:
    json.dump({"step_s": steps}, f)


def run_variant(name: str, overrides: dict, args) -> dict:
  with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--hf", args.hf,
           "--workdir", tmp, "--out", out, "--overrides", json.dumps(overrides),
           "--batch", str(args.batch), "--responses", str(args.responses),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with open(os.path.join(tmp, "log.txt"), "w") as log:
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
      # wait4, not wait: it returns this child's own resource usage (ru_maxrss in KiB).
      _, status, usage = os.wait4(proc.pid, 0)
      proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not os.path.exists(out):
      tail = open(os.path.join(tmp, "log.txt")).read()[-1500:]
      return {"name": name, "error": f"exit {proc.returncode}: ...{tail}"}
    steps = json.load(open(out))["step_s"]
  return {"name": name, "peak_rss_mib": usage.ru_maxrss / 1024,
          "step_s_median": statistics.median(steps), "step_s_min": min(steps),
          "steps": len(steps)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--hf", default="/tmp/smol_hf", help="SmolLM2-135M as an HF directory")
  ap.add_argument("--batch", type=int, default=2, help="prompts a step")
  ap.add_argument("--responses", type=int, default=2, help="responses per prompt (K)")
  ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (data.max_len)")
  ap.add_argument("--steps", type=int, default=5, help="steps measured after the warmup")
  ap.add_argument("--warmup", type=int, default=2, help="steps left out (compile, first touch)")
  ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
  ap.add_argument("--json", default="", help="also write the rows here")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--workdir", help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return child(args)
  if not os.path.exists(os.path.join(args.hf, "config.json")):
    sys.exit(f"{args.hf}: not an HF directory; make it with the command in this file's docstring")
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
  rows = []
  with common.Run("lora_memory", args.json) as run:
    for name in names:
      rows.append(run_variant(name, VARIANTS[name], args))
      run.mark(f"after {name}")
    run.data["variants"] = rows
  print(f"\nSmolLM2-135M, Stage 1 loss, batch {args.batch} x {args.responses} x {args.seq} "
        f"tokens, f32 on CPU, median of {args.steps} steps after {args.warmup}; "
        f"{common.load_text()}")
  print("| variant | peak RSS (MiB) | step s (median) | step s (min) |")
  print("|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['name']} | failed: {r['error'][-300:]!r} | | |")
    else:
      print(f"| {r['name']} | {r['peak_rss_mib']:.0f} | {r['step_s_median']:.2f} | "
            f"{r['step_s_min']:.2f} |")


if __name__ == "__main__":
  main()
