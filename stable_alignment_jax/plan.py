"""Memory and step-time planner: will a stage config fit, and how fast can it go, on a pod?

  python -m stable_alignment_jax.plan --config=configs/stage3.py --hardware=v5p-64
  python -m stable_alignment_jax.plan --config=configs/stage3.py --hardware=h100x8 \
      --mesh=data=1,fsdp=-1,tensor=1
  python -m stable_alignment_jax.plan --config=configs/stage3.py --model=gemma2_9b
  python -m stable_alignment_jax.plan --config=configs/stage3.py --model=llama3_1_8b \
      --hardware=v5p-8,h100x1 --lora_table=16 --data_lengths=false   # full / LoRA / QLoRA
  python -m stable_alignment_jax.plan --config=configs/ppo.py       # any method's config

No device is touched: the model is traced abstractly (`nnx.eval_shape`), so a 7B or 70B plan runs
on a laptop. Per-device bytes come from the same logical-axis rule table the trainer uses, so
parameter and optimizer figures are exact (a test checks them against a real 8-device state);
activation bytes and step time are estimates whose assumptions are printed with them.

It also reads the config's training data (when it is there) and prints what `data.max_len`
costs each kind, as the trainer would before its first step: examples dropped, responses left
out or cut, the p50/p95/p99 token lengths of prompts and responses, and the max_len that keeps
99 % of responses whole (`--data_lengths=false` skips it).
"""

import re
import sys

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from stable_alignment_jax.training import budget, losses
from stable_alignment_jax.model import sharding
from stable_alignment_jax.training.flops import CHIPS, Chip, positions_run, step_flops
from stable_alignment_jax.model.presets import ModelConfig, preset


ACHIEVABLE = 0.6  # fraction of peak the matmuls of a well-sharded step reach (assumption)


def parse_hardware(spec: str) -> tuple[Chip, int]:
  """`v5p-64` (TPU slice: TensorCores, 2 per v4/v5p chip) or `h100x8` (8 GPUs) -> (chip, n)."""
  m = re.fullmatch(r"(v4|v5p)-(\d+)", spec) or re.fullmatch(r"(h100)x(\d+)", spec)
  if not m:
    raise ValueError(f"--hardware={spec!r}: expected e.g. v4-32, v5p-64 or h100x8")
  n = int(m.group(2))
  if m.group(1) in ("v4", "v5p"):
    if n % 2:
      raise ValueError(f"--hardware={spec!r}: a {m.group(1)} slice counts 2 cores per chip")
    n //= 2
  return CHIPS[m.group(1)], n


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = int(v)
  return out


def with_preset(c, name: str):
  """The config `c` with its model replaced by the preset `name` (model/presets.py: llama*,
  smollm2*, qwen2_5*, qwen3*, gemma2*, gemma3*), keeping the run's dtype, param_dtype, remat and
  layer layout; `c.model.preset` alone only names the preset the fields were filled from."""
  c = c.copy_and_resolve_references()
  ours = {k: c.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers") if k in c.model}
  cfg = preset(name, **ours)
  with c.unlocked():
    c.model = {"preset": name, **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}}
  return c


def plan(c, chip: Chip, n_devices: int, mesh_sizes: dict[str, int] | None = None) -> dict:
  """Every figure of the printed plan, as a dict (tests compare it to measured bytes)."""
  cfg = ModelConfig.from_dict(c.model)
  shape = sharding.mesh_shape(mesh_sizes or dict(c.mesh), n_devices)
  sizes = dict(zip(sharding.MESH_AXES, shape))
  state = budget.state_bytes(c, sizes)
  params_total = state.pop("params_total")
  method = budget.method_of(c)
  # The preference losses that need one run a reference forward each step (under LoRA too:
  # the base with the adapters off); a PPO update's pi_ref and reward forwards belong to the
  # rollout, not to the step planned here.
  reference = method == "preference" and losses.needs_reference(c.loss.name)
  dp = sizes["data"] * sizes["fsdp"]
  prompts, k, seq = budget.step_shape(c)
  rows_total = prompts * k
  accum = (c.optim.accum_steps if method == "preference" else 1) or budget.accum_for_budget(
      c, budget.HBM_FRACTION * chip.hbm - sum(state.values()), sizes)
  micro_rows = rows_total // accum
  if micro_rows % dp:
    raise ValueError(f"{micro_rows} sequences per micro-batch do not split over {dp} "
                     f"data-parallel devices")
  act = budget.activation_bytes(cfg, micro_rows // dp, seq, sizes["tensor"],
                                c.train.get("logprob_chunk", 0))
  mem = {**state, **{f"activations_{k}": v for k, v in act.items()}}
  mem["total"] = sum(mem.values())

  tokens = rows_total * seq
  # A set train.shared_prefix runs that many prompt tokens once per example, not once per row;
  # the automatic one (-1) depends on the data, so the plan counts every position then.
  computed = positions_run(prompts, k, seq, max(c.train.get("shared_prefix", 0), 0))
  model_flops, hw_flops = step_flops(cfg, computed, seq, reference=reference,
                                     frozen_base=budget.lora_block(c) is not None)
  compute = hw_flops / n_devices / (chip.peak_bf16 * ACHIEVABLE)
  # FSDP: all-gather bf16 weights for forward and backward, reduce-scatter the gradients.
  gather = sizes["fsdp"]
  wire = (3 * params_total * 2 / np.dtype(cfg.param_dtype).itemsize * (gather - 1) / gather
          / sizes["tensor"]) if gather > 1 else 0.0
  comm = wire / chip.link
  step = max(compute, comm)  # communication overlaps compute when the program is well scheduled
  return {"chip": chip.name, "devices": n_devices, "mesh": sizes, "num_params": cfg.num_params(),
          "accum_steps": accum, "bytes_per_device": mem, "hbm": chip.hbm,
          "fits": mem["total"] < budget.HBM_FRACTION * chip.hbm,
          "tokens_per_step": tokens, "model_flops": model_flops, "hardware_flops": hw_flops,
          "compute_s": compute, "comm_s": comm, "step_s": step,
          "mfu": model_flops / n_devices / chip.peak_bf16 / step,
          "tokens_per_s": tokens / step}


def with_lora(c, rank: int, quantize: str = ""):
  """The config `c` with LoRA of this rank (0: full fine-tuning) and this quantization of the
  frozen base; the other lora.* keys stay the config's (configs/base.py's defaults)."""
  c = c.copy_and_resolve_references()
  with c.unlocked():
    if "lora" not in c:
      c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0,
                                          "targets": tuple(budget.LORA_TARGETS), "quantize": "",
                                          "quant_block": 64})
    c.lora.rank, c.lora.quantize = rank, quantize
  return c


LORA_VARIANTS = (("full", 0, ""), ("LoRA", None, ""), ("QLoRA int8", None, "int8"),
                 ("QLoRA nf4", None, "nf4"))


def lora_table(c, hardware: list[str], rank: int, mesh_sizes=None) -> str:
  """A markdown table: full fine-tuning, LoRA and QLoRA (int8, nf4) of config `c` on each
  slice, GiB per device and whether the step fits in 90% of HBM."""
  gib = lambda x: f"{x / 2**30:.1f}"
  head = ("| hardware | variant | trainable | frozen base | optimizer + grads | reference | "
          "activations | total GiB/device | micro-batches | fits |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for hw in hardware:
    chip, n = parse_hardware(hw)
    for label, r, quant in LORA_VARIANTS:
      p = plan(with_lora(c, rank if r is None else r, quant), chip, n, mesh_sizes)
      m = p["bytes_per_device"]
      act = m["activations_layers"] + m["activations_logits"]
      lines.append(f"| {hw} | {label}{f' r={rank}' if r is None else ''} | {gib(m['params'])} | "
                   f"{gib(m['frozen_base'])} | {gib(m['optimizer'] + m['gradients'])} | "
                   f"{gib(m['reference'] + m['reward_model'])} | {gib(act)} | {gib(m['total'])} | "
                   f"{p['accum_steps']} | {'yes' if p['fits'] else 'NO'} |")
  return "\n".join(lines)


def format_plan(p: dict) -> str:
  gib = lambda x: f"{x / 2**30:8.2f} GiB"
  lines = [f"{p['chip']} x{p['devices']}  mesh {p['mesh']}  model {p['num_params'] / 1e9:.2f}B "
           f"params, {p['accum_steps']} micro-batch(es) a step", "per device:"]
  lines += [f"  {k:<20}{gib(v)}" for k, v in p["bytes_per_device"].items()]
  lines.append(f"  of HBM {gib(p['hbm'])}: {'fits' if p['fits'] else 'DOES NOT FIT (>90%)'}")
  lines.append(f"step: {p['tokens_per_step']} tokens, {p['model_flops'] / 1e15:.2f} PFLOP model "
               f"({p['hardware_flops'] / 1e15:.2f} executed with recompute)")
  lines.append(f"  compute {p['compute_s'] * 1e3:.1f} ms at {ACHIEVABLE:.0%} of peak, FSDP "
               f"collectives {p['comm_s'] * 1e3:.1f} ms -> step {p['step_s'] * 1e3:.1f} ms, "
               f"MFU {p['mfu']:.1%}, {p['tokens_per_s']:,.0f} tokens/s")
  return "\n".join(lines)


def data_report(c) -> str:
  """What max_len costs the config's training data, per kind (data_lengths.describe)."""
  from stable_alignment_jax.data import loader as data, data_lengths
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  loader = data.make_loader(
      data.open_mixture(c.data, c.data.train_split, c.seed), load_tokenizer(c.data.tokenizer),
      global_batch_size=1, max_len=c.data.max_len, num_responses=c.data.num_responses,
      seed=c.seed, shard_index=0, shard_count=1, prompt_format=c.data.get("prompt_format", "auto"),
      truncation=c.data.get("truncation", "drop"))
  stats = loader.stats
  over = data_lengths.over_limit(stats["entries"])
  verdict = ("a run would stop: more than 5% lost" if over and not
             c.data.get("accept_length_loss", False) else "a run would start")
  return data_lengths.report(stats, c.data.max_len) + f"\ndata: {verdict}"


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  if _DATA_LENGTHS.value:
    try:
      print(data_report(_CONFIG.value))
    except Exception as e:  # noqa: BLE001 - data not built or reachable: the plan still stands
      print(f"data: lengths not measured ({type(e).__name__}: {e})")
    print()
  c = with_preset(_CONFIG.value, _MODEL.value) if _MODEL.value else _CONFIG.value
  if _LORA_TABLE.value:
    cfg = ModelConfig.from_dict(c.model)
    print(f"{c.model.get('preset', '')}: {cfg.num_params() / 1e9:.2f}B params, batch "
          f"{' x '.join(map(str, budget.step_shape(c)))} (prompts x responses x tokens), "
          f"method {budget.method_of(c)}")
    print(lora_table(c, _HARDWARE.value, _LORA_TABLE.value, parse_mesh(_MESH.value) or None))
    return
  for hw in _HARDWARE.value:
    chip, n = parse_hardware(hw)
    print(format_plan(plan(c, chip, n, parse_mesh(_MESH.value) or None)))
    print()
  sys.stdout.flush()


def cli():
  """The command line, also setup.py's console script. Flags are defined here, not at import,
  so importing this module (the pipeline, tests) defines none."""
  global _CONFIG, _HARDWARE, _MESH, _DATA_LENGTHS, _MODEL, _LORA_TABLE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "stage config, e.g. configs/stage3.py",
                                            lock_config=True)
  _HARDWARE = flags.DEFINE_list("hardware", ["v4-64", "v5p-64", "h100x8"],
                                "slices to plan for: v4-N / v5p-N (TensorCores) or h100xN")
  _MESH = flags.DEFINE_string("mesh", "", "mesh override, e.g. data=1,fsdp=-1,tensor=1")
  _DATA_LENGTHS = flags.DEFINE_bool("data_lengths", True, "also report what data.max_len "
                                    "costs the config's training data (reads the data)")
  _MODEL = flags.DEFINE_string("model", "", "plan this model preset instead of the config's, "
                               "e.g. qwen3_8b, gemma2_9b (model/presets.py)")
  _LORA_TABLE = flags.DEFINE_integer("lora_table", 0, "> 0: instead of the plan, a table of full "
                                     "fine-tuning, LoRA and QLoRA (int8, nf4) at this rank")
  app.run(main)


if __name__ == "__main__":
  cli()
