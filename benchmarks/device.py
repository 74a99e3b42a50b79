"""One script for the day a chip is lent: training step, sampler vs HF generate, decode cost vs
position, and the planner's step time beside the measured one, within ~8 minutes on one GPU or
TPU host. Prints one table and writes JSON.

  python benchmarks/device.py [--json device.json] [--budget_s 480]   # llama3_2_1b shape
  python benchmarks/device.py --dry                                    # CPU, tiny preset

(a) train: `train.train_step` (SA-CPO, one jit, [B*K, T] in one forward, AdamW) of a random
    llama3_2_1b-shaped model, bf16 compute over f32 master weights; tokens/s and MFU against the
    chip's peak bf16 FLOP/s from the project's table (stable_alignment_jax/training/flops.py).
(d) plan: `plan.plan` for the same config on one chip: predicted step time beside (a)'s.
(c) decode: ms per decode step (the model's cached forward in a jitted loop, as the sampler's
    body runs it) at position `far` over position `near`, batch 1 and 16.
(b) sampler: `Sampler.generate` vs HF `generate` (its KV cache, SDPA attention, the same dtype
    on the same device; torch threads = cores on a CPU) at batch 1, 16 and 64, greedy, every row
    `new` tokens; HF's figure checked against its own prefill + new x one cached decode step.
Every figure is min and median of alternated runs; the load average is printed around them
(benchmarks/common.py). `--dry` runs the same code on the tiny preset on CPU (the test suite
does, so it cannot rot); its figures mean nothing.
"""

import argparse
import dataclasses
import functools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/, benchmarks/

from benchmarks import common  # noqa: E402

if "--dry" in sys.argv:
  common.one_cpu_device()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from configs import common as config_common  # noqa: E402
from stable_alignment_jax.training import budget, train  # noqa: E402
from stable_alignment_jax import plan  # noqa: E402
from stable_alignment_jax.model import sharding  # noqa: E402
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams, jit_decode  # noqa: E402
from stable_alignment_jax.model import llama  # noqa: E402
from stable_alignment_jax.model.hf_config import config_to_hf  # noqa: E402
from stable_alignment_jax.model.presets import ModelConfig  # noqa: E402

try:  # the optimizer and the chip table moved out of train.py / plan.py; either layout works
  from stable_alignment_jax.training.optim import make_optimizer
except ImportError:  # pragma: no cover
  make_optimizer = train.make_optimizer
try:
  from stable_alignment_jax.training.flops import CHIPS, positions_run, step_flops
except ImportError:  # pragma: no cover
  CHIPS, step_flops = plan.CHIPS, plan.step_flops

FULL = dict(preset="llama3_2_1b", prompts=4, responses=2, seq=1024, prompt_len=128, steps=5,
            near=32, far=1024, pos_new=64, pos_batches=(1, 16), gen_batches=(1, 16, 64),
            gen_prompt=64, gen_new=128, runs=3)
DRY = dict(preset="tiny", prompts=2, responses=2, seq=64, prompt_len=16, steps=2,
           near=8, far=128, pos_new=4, pos_batches=(1,), gen_batches=(1, 4),
           gen_prompt=16, gen_new=8, runs=2)


def chip_of(device):
  """The table's chip for this device (a CPU, or a chip the table lacks: None)."""
  kind = device.device_kind
  for c in CHIPS.values():
    key = getattr(c, "device_kind", c.name)
    if key in kind:
      return c
  return None


def model_config(s: dict, remat: str, dtype: str) -> tuple[dict, ModelConfig]:
  block = config_common.model_block(s["preset"], dtype=dtype, param_dtype="float32", remat=remat,
                                    max_seq_len=max(s["seq"], s["far"] + s["pos_new"],
                                                    s["gen_prompt"] + s["gen_new"]))
  return block, ModelConfig.from_dict(block)


def make_batch(b, k, t, prompt_len, vocab, seed=0) -> dict[str, np.ndarray]:
  """K responses per prompt sharing its first `prompt_len` tokens; every row fills T."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(b, k, t)).astype(np.int32)
  tokens[:, :, :prompt_len] = tokens[:, :1, :prompt_len]
  loss_mask = np.zeros((b, k, t), np.float32)
  loss_mask[:, :, prompt_len:] = 1.0
  return {"tokens": tokens, "loss_mask": loss_mask,
          "ratings": rng.integers(1, 8, size=(b, k)).astype(np.float32),
          "response_mask": np.ones((b, k), np.float32)}


def sync(x):
  return jax.block_until_ready(x)


def bench_train(s, cfg, block, mesh) -> dict:
  """The training step as the default config runs it: micro-batches chosen for this device's
  memory (optim.accum_steps = 0, budget.py), log-probs in chunks of train.logprob_chunk, and
  each example's prompt run once (train.shared_prefix = -1: every prompt is prompt_len)."""
  c = base.get_config()
  lc, oc = c.loss, c.optim
  b, k, t = s["prompts"], s["responses"], s["seq"]
  c.model = block
  c.data.batch_size, c.data.num_responses, c.data.max_len = b, k, t
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  accum, why = budget.auto_accum_steps(c, mesh)
  prefix = train.shared_prefix_for(c.train.shared_prefix, s["prompt_len"], t)[0]
  graphdef, params = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  tx = make_optimizer(oc, 100)[0]
  batch = jax.tree.map(jnp.asarray, make_batch(b, k, t, s["prompt_len"], cfg.vocab_size))
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                                   table=train.loss_table(lc, []), accum_steps=accum,
                                   logprob_chunk=c.train.logprob_chunk,
                                   shared_prefix=prefix),
                 donate_argnums=0)
  with sharding.activate(mesh):
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    t0 = time.perf_counter()
    state, m = sync(step(state, batch))
    compile_s = time.perf_counter() - t0
    loss = float(m["loss"])
    times = []
    for _ in range(s["steps"]):
      t0 = time.perf_counter()
      state, m = sync(step(state, batch))
      times.append(time.perf_counter() - t0)
  del state
  tokens = b * k * t
  # MFU on the positions the step runs: each prompt once, each response's tail K times.
  model_flops = step_flops(cfg, positions_run(b, k, t, prefix), t, reference=False)[0]
  # The planner on the same config, one chip of this kind, with the micro-batches and the
  # shared prefix timed here.
  c.optim.accum_steps, c.train.shared_prefix = accum, prefix
  return {"tokens": tokens, "compile_s": compile_s, "first_loss": loss, "times": times,
          "model_flops": model_flops, "plan_config": c, "accum_steps": accum,
          "accum_why": why, "shared_prefix": prefix}


@functools.partial(jit_decode, static_argnames=("graphdef", "n"))
def _decode(state, cache, start, *, graphdef, n):
  """n greedy cached decode steps from slot `start` (what the sampler's loop body runs, compiled
  as the sampler compiles it)."""
  model = nnx.merge(graphdef, state)
  b, slots = jax.tree.leaves(cache)[0].shape[-3] // model.cfg.n_kv_heads, llama.cache_len(cache)

  def body(i, carry):
    tok, cache = carry
    pos = start + i
    key_mask = jnp.broadcast_to(jnp.arange(slots)[None] <= pos, (b, slots))
    logits, cache = model(tok[:, None], positions=jnp.full((b, 1), pos), key_mask=key_mask,
                          cache=cache, cache_index=pos)
    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

  return jax.lax.fori_loop(0, n, body, (jnp.zeros((b,), jnp.int32), cache))[0]


def bench_decode(s, sampler) -> dict:
  out = {}
  n = s["pos_new"]
  for b in s["pos_batches"]:
    caches = {p: llama.init_cache(sampler.cfg, b, p + n) for p in (s["near"], s["far"])}
    fns = {p: (lambda p=p: sync(_decode(sampler.state, caches[p], p, graphdef=sampler.graphdef,
                                        n=n))) for p in caches}
    for f in fns.values():
      f()  # compile
    times = common.alternate(fns, max(3, s["runs"] + 2))
    out[b] = {p: [x / n for x in v] for p, v in times.items()}
  return out


def hf_model(cfg, device: str):
  import torch
  import transformers
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
  hc = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg, cfg.dtype).items()
                                   if k not in ("architectures", "model_type", "torch_dtype")})
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa",
                                                       dtype=dtype)
  return model.eval()


def bench_sampler(s, sampler, cfg) -> dict:
  """Ours vs HF generate per batch size: tokens/s, and HF's independent per-step estimate."""
  try:
    import torch
  except ImportError:
    torch = None
  device = "cpu"
  if torch is not None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
      common.torch_threads(torch)
  ours_on = jax.devices()[0].platform
  if torch is not None and ours_on != "cpu" and device == "cpu":
    torch = None  # a CPU-only torch beside a GPU/TPU JAX: not the same device, no comparison
  hf = hf_model(cfg, device) if torch is not None else None
  tsync = (torch.cuda.synchronize if device == "cuda" else (lambda: None)) if torch else None
  rng = np.random.default_rng(0)
  new = s["gen_new"]
  sp = SamplingParams(max_new_tokens=new)
  out = {"hf": hf is not None, "hf_device": device}
  for b in s["gen_batches"]:
    prompts = rng.integers(3, cfg.vocab_size, size=(b, s["gen_prompt"])).astype(np.int64)
    ours = lambda: sampler.generate(prompts.tolist(), sp)
    assert all(len(x) == new for x in ours()), "a row stopped early"  # and compiled
    sides = {"ours": ours}
    if hf is not None:
      ids = torch.from_numpy(prompts).to(device)

      def theirs():
        with torch.inference_mode():
          r = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=None)
        tsync()
        return r

      theirs()  # warm-up
      sides["hf"] = theirs
      estimate = min(common.hf_generate_parts_s(hf, ids, new, tsync) for _ in range(2))
    times = common.alternate(sides, s["runs"])
    out[b] = {"times": times, "tokens": b * new}
    if hf is not None:
      out[b]["hf_estimate_s"] = estimate
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dry", action="store_true", help="CPU, tiny preset: the code path only")
  ap.add_argument("--json", default="device.json")
  ap.add_argument("--budget_s", type=float, default=480.0, help="skip sections past this")
  ap.add_argument("--remat", default="dots", help="as the stage configs train (none|dots|full)")
  ap.add_argument("--sections", default="train,decode,sampler")
  a = ap.parse_args()
  s = DRY if a.dry else FULL
  t_start = time.perf_counter()
  device = jax.devices()[0]
  chip = chip_of(device)
  dtype = "float32" if a.dry else "bfloat16"
  block, cfg = model_config(s, a.remat, dtype)
  mesh = sharding.make_mesh({"fsdp": -1}, jax.devices()[:1])
  sections = a.sections.split(",")
  with common.Run("device", a.json) as run:
    run.row("device", f"{device.platform} {device.device_kind} (1 of {jax.device_count()}); "
            f"chip in the table: {chip.name if chip else 'none (no MFU, no plan)'}")
    run.row("model", f"{s['preset']} shape, random init, {cfg.num_params() / 1e9:.3f}B params, "
            f"compute {cfg.dtype}, master weights {cfg.param_dtype}, remat {cfg.remat}")
    run.data["config"] = {"preset": s["preset"], "dry": a.dry, **{k: list(v) if isinstance(
        v, tuple) else v for k, v in s.items()}, "device_kind": device.device_kind}
    over = lambda: time.perf_counter() - t_start > a.budget_s

    if "train" in sections:
      r = bench_train(s, cfg, block, mesh)
      st = common.stats(r["times"])
      run.row("(a) train step s", common.summary(r["times"]) + f"; compile {r['compile_s']:.1f} s")
      run.row("(a) micro-batches", f"{r['accum_steps']} ({r['accum_why']}), logprob_chunk "
              f"{base.get_config().train.logprob_chunk}, shared prefix {r['shared_prefix']}")
      tps = r["tokens"] / st["min"]
      mfu = r["model_flops"] / st["min"] / chip.peak_bf16 if chip else None
      run.row("(a) train tokens/s", f"{tps:,.0f} (median {r['tokens'] / st['median']:,.0f}); "
              f"B={s['prompts']} x K={s['responses']} x T={s['seq']} = {r['tokens']} tokens, "
              f"loss {r['first_loss']:.4f}")
      run.row("(a) train MFU", f"{mfu:.1%} of {chip.peak_bf16 / 1e12:.0f} TFLOP/s bf16 "
              f"({r['model_flops'] / 1e12:.2f} TFLOP model per step)" if chip else
              "n/a: this chip has no peak in stable_alignment_jax/training/flops.py")
      run.data["train"] = {"times": r["times"], "tokens": r["tokens"], "tokens_per_s": tps,
                           "mfu": mfu, "compile_s": r["compile_s"], "loss": r["first_loss"],
                           "accum_steps": r["accum_steps"], "shared_prefix": r["shared_prefix"]}
      p = plan.plan(r["plan_config"], chip or dataclasses.replace(
          CHIPS["h100"], name="(H100 peak, as a stand-in)"), 1)
      run.row("(d) planner step s", f"predicted {p['step_s']:.4g} s (compute "
              f"{p['compute_s']:.4g} s at {plan.ACHIEVABLE:.0%} of peak; {p['chip']}) vs measured "
              f"{st['min']:.4g} s = {st['min'] / p['step_s']:.2f}x; predicted bytes/device "
              f"{p['bytes_per_device']['total'] / 2**30:.1f} GiB")
      run.data["plan"] = {"step_s": p["step_s"], "measured_s": st["min"],
                          "bytes_per_device": p["bytes_per_device"], "chip": p["chip"]}
      run.mark("after (a)")

    icfg = dataclasses.replace(cfg, remat="none")  # inference: nothing to recompute
    graphdef, state = sharding.build_sharded(lambda: llama.Llama(icfg, rngs=nnx.Rngs(0)), mesh)
    sampler = Sampler(graphdef, state, eos_id=-1)  # no token is EOS: every row runs to `new`
    if "decode" in sections and not over():
      d = bench_decode(s, sampler)
      run.data["decode"] = {str(b): {str(p): v for p, v in x.items()} for b, x in d.items()}
      for b, x in d.items():
        near, far = (common.stats(x[p]) for p in (s["near"], s["far"]))
        run.row(f"(c) decode ms/step b={b}", f"pos {s['near']}: {near['min'] * 1e3:.3f} (median "
                f"{near['median'] * 1e3:.3f}); pos {s['far']}: {far['min'] * 1e3:.3f} (median "
                f"{far['median'] * 1e3:.3f}) -> far/near {far['min'] / near['min']:.2f} "
                f"(target <= 1.5)")
      run.mark("after (c)")
    elif "decode" in sections:
      run.row("(c) decode", f"skipped: past the {a.budget_s:.0f} s budget")

    if "sampler" in sections and not over():
      g = bench_sampler(s, sampler, icfg)
      run.data["sampler"] = {str(k): v for k, v in g.items()}
      for b in s["gen_batches"]:
        x = g[b]
        ours = common.stats(x["times"]["ours"])
        line = f"ours {x['tokens'] / ours['min']:,.0f} (median {x['tokens'] / ours['median']:,.0f})"
        if g["hf"]:
          hf = common.stats(x["times"]["hf"])
          line += (f"; HF {x['tokens'] / hf['min']:,.0f} (median "
                   f"{x['tokens'] / hf['median']:,.0f}) -> {hf['min'] / ours['min']:.2f}x")
          run.check(*common.sanity(f"HF generate b={b}", hf["min"], x["hf_estimate_s"]))
        run.row(f"(b) tokens/s b={b}", line + f"; {s['gen_prompt']} prompt + {s['gen_new']} new")
      if not g["hf"]:
        run.row("(b) HF", "no torch/transformers on this device: ours only")
      else:
        run.row("(b) HF baseline", f"LlamaForCausalLM, SDPA attention, its KV cache, "
                f"{cfg.dtype} on {g['hf_device']}, random init (speed only)")
      run.mark("after (b)")
    elif "sampler" in sections:
      run.row("(b) sampler", f"skipped: past the {a.budget_s:.0f} s budget")
    run.row("wall s", f"{time.perf_counter() - t_start:.1f}")


if __name__ == "__main__":
  main()
