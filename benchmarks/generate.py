"""KV-cache sampling: our `Sampler` vs `transformers` `generate`, and decode cost vs position.

Measured on the same random LLaMA weights (vocab 8000, dim 256, 4 layers, 8 heads over
4 KV heads; exported with `convert.save_hf`, loaded by `transformers.LlamaForCausalLM` in f32):
  * tokens/s of `Sampler.generate` against HF `model.generate` (its own KV cache), 16 prompts of
    mixed length (left-padded) x 128 new tokens, greedy; printed as a ratio (target >= 3x);
  * our decode time per token at position 1024 over that at position 32 (target <= 1.5): the
    model's decode step (what the sampler's while_loop body runs) for N steps
    in a loop compiled as the sampler compiles its decode (`generate.jit_decode`: on CPU
    without XLA's YNNPACK dots) over a cache of 1024+N vs 32+N slots, so no prefill enters
    the figure (differencing whole generate runs of N and 2N tokens drowns in the noise of a
    16 x 1024 prefill). Printed for the benchmark's batch of 16 and for batch 1.
    Beside each ratio, its floor from memory bandwidth: the near step plus the time to read the
    far cache's extra bytes at this device's read bandwidth (a jitted sum over 256 MB in the same
    process): no decode step that reads that cache can come in under it.

Both sides run in f32 on the CPU, torch with as many threads as cores and HF generate as its
users run it (its KV cache, SDPA attention); HF's time is checked against its own prefill plus
`new` cached one-token forwards timed alone, so a sick baseline cannot pass for a win. Runs
alternate (benchmarks/common.py: the order flips each round) so a change in machine load hits
both; minimum and median are reported, with the load before and after and a contamination flag.
Compiles happen in a warm-up before the timed runs.

The cache options are compared in the same process, alternated: `--cache_dtype bfloat16` times
the position loops over an f32 and a bf16 cache side by side, and the headline sampler uses it.
The sampler's windowed cache (it grows as decoding fills it, `--min_window`) is timed against one
sized for all of max_new_tokens from the start (min_window=0, as before windows) on what a
server allowing `--long_new` tokens sees when answers stop after `--new`: the first `--new`
steps of a `--long_new` request (a stream chunk, the generator then dropped).

With `--sliding_window W` (default 256) the far position's loop also runs with all layers but
the last sliding over W keys (the same weights; Gemma's local layers beside a global one): each
local layer keeps and reads a ring of W + 15 slots, not the whole cache.

  python benchmarks/generate.py [--runs 3] [--batch 16] [--new 128] [--pos_batches 16,1]
                                [--cache_dtype bfloat16] [--min_window 32] [--long_new 1024]
                                [--sliding_window 256]
"""

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

common.one_cpu_device()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from stable_alignment_jax.sampling.generate import (  # noqa: E402
    Sampler, SamplingParams, greedy_tokens, jit_decode)
from stable_alignment_jax.model import convert, llama  # noqa: E402
from stable_alignment_jax.model.presets import ModelConfig  # noqa: E402

NO_EOS = -1  # an id no token has: every row runs to max_new_tokens on both sides


def hf_generate(model, prompts, new: int) -> list[list[int]]:
  """Greedy HF generate on the left-padded batch; exactly `new` tokens per row."""
  p = max(len(x) for x in prompts)
  ids = torch.zeros((len(prompts), p), dtype=torch.long)
  mask = torch.zeros((len(prompts), p), dtype=torch.long)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = torch.tensor(x)
    mask[i, p - len(x):] = 1
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True)
  return out[:, p:].tolist()


def decode_cache(cfg, batch: int, length: int, dtype=None):
  """The model's own decode cache; its contents do not change the cost."""
  return llama.init_cache(cfg, batch, length, dtype=dtype)


@functools.partial(jit_decode, static_argnames=("graphdef", "n"))
def decode_loop(state, cache, start, *, graphdef, n: int):
  """n greedy decode steps through the model (as the sampler's loop body runs them), writing
  slots start..start+n-1."""
  model = nnx.merge(graphdef, state)
  b, s = jax.tree.leaves(cache)[0].shape[-3] // model.cfg.n_kv_heads, llama.cache_len(cache)
  key_mask = jnp.broadcast_to(jnp.arange(s)[None, :] < start, (b, s))

  def body(carry):
    i, tok, cache, key_mask = carry
    key_mask = key_mask.at[:, start + i].set(True)
    logits, cache = model(tok[:, None], positions=jnp.full((b, 1), start + i), key_mask=key_mask,
                          cache=cache, cache_index=start + i)
    return i + 1, greedy_tokens(logits[:, 0]), cache, key_mask

  init = (jnp.int32(0), jnp.zeros((b,), jnp.int32), cache, key_mask)
  return jax.lax.while_loop(lambda c: c[0] < n, body, init)[1]


def cache_bytes(cfg, batch: int, length: int, dtype) -> int:
  """Bytes of a decode cache (every slot is read each step)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
      lambda: llama.init_cache(cfg, batch, length, dtype=dtype))))


def read_bandwidth(mb: int = 256, reps: int = 5) -> float:
  """Memory read bandwidth of this device in bytes/s: the best of `reps` jitted sums over an
  f32 array far larger than any cache level."""
  x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.nbytes / min(common.timed(lambda: total(x).block_until_ready())[0]
                        for _ in range(reps))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
  """Mean fraction of each row's tokens before the first disagreement (f32 near-ties diverge)."""
  fr = []
  for x, y in zip(a, b):
    n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    fr.append(n / max(len(x), 1))
  return float(np.mean(fr))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3, help="timed runs per side")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--near", type=int, default=32, help="early decode position")
  ap.add_argument("--far", type=int, default=1024, help="late decode position")
  ap.add_argument("--pos_new", type=int, default=64, help="decode steps per timed loop")
  ap.add_argument("--pos_runs", type=int, default=7, help="timed decode loops per position")
  ap.add_argument("--pos_batches", default="16,1", help="batch sizes of the position runs")
  ap.add_argument("--scan_layers", type=int, default=1, help="1: layers under lax.scan (the "
                  "default layout), 0: unrolled")
  ap.add_argument("--cache_dtype", default="", help="the sampler's KV cache dtype (default: "
                  "the compute dtype); the position loops time it beside the f32 cache")
  ap.add_argument("--min_window", type=int, default=32, help="the sampler's first cache window")
  ap.add_argument("--long_new", type=int, default=1024, help="max_new_tokens of the long-"
                  "request row (0: skip it)")
  ap.add_argument("--sliding_window", type=int, default=256, help="also time the far decode "
                  "step with every layer sliding over this window (0: skip)")
  ap.add_argument("--json", default="", help="also write the figures here")
  args = ap.parse_args()
  threads = common.torch_threads(torch)

  cfg = ModelConfig(vocab_size=8000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                    max_seq_len=2048, dtype="float32", scan_layers=bool(args.scan_layers))
  # The same seed gives the same weights in either layout; HF gets them from the unrolled one.
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  with tempfile.TemporaryDirectory() as d:
    convert.save_hf(*nnx.split(llama.Llama(unrolled, rngs=nnx.Rngs(0))), d)
    # As HF's users run it: its KV cache and SDPA attention.
    hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()
  graphdef, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  cache_dtype = args.cache_dtype or None
  sampler = Sampler(graphdef, state, eos_id=NO_EOS, cache_dtype=cache_dtype,
                    min_window=args.min_window)

  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, size=int(n)).tolist()
             for n in rng.integers(16, 65, size=args.batch)]
  sp = SamplingParams(max_new_tokens=args.new)

  with common.Run("generate", args.json) as run:
    # Warm-up: compiles ours; checks both sides agree on the greedy tokens of the same weights.
    compile_s, ours = common.timed(lambda: sampler.generate(prompts, sp))
    theirs = hf_generate(hf, prompts, args.new)
    assert all(len(x) == args.new for x in ours), "a row stopped early"
    # The sampler as it was before cache options (f32 cache sized for all new tokens at once),
    # timed beside, so a change in the options is measured in this process.
    plain = Sampler(graphdef, state, eos_id=NO_EOS, min_window=0)
    same_plain = plain.generate(prompts, sp) == ours
    times = common.alternate({"ours": lambda: sampler.generate(prompts, sp),
                              "hf": lambda: hf_generate(hf, prompts, args.new),
                              "plain": lambda: plain.generate(prompts, sp)}, args.runs)
    p = max(len(x) for x in prompts)  # HF's left-padded batch has this width
    estimate = min(common.hf_generate_parts_s(hf, torch.zeros((args.batch, p), dtype=torch.long),
                                              args.new) for _ in range(2))
    run.mark("after the generate runs")
    tokens = args.batch * args.new
    ot, ht = min(times["ours"]), min(times["hf"])

    # Decode cost per step near position `near` and `far`, timed on the decode loop alone: at
    # 1024 prompt tokens the prefill costs seconds and its noise swamps t(2N) - t(N).
    n = args.pos_new
    # The layout the sampler decodes with (unrolled layers; see llama.relayout).
    dg, ds, dcfg = sampler.graphdef, sampler.state, sampler.cfg
    # Gemma's pattern: local layers beside a global one (the last), so each local layer keeps a
    # ring of its window's slots
    wcfg = dataclasses.replace(dcfg, sliding_window=args.sliding_window,
                               layer_types=("sliding",) * (dcfg.n_layers - 1) + ("full",))
    wg = nnx.graphdef(nnx.eval_shape(lambda: llama.Llama(wcfg, rngs=nnx.Rngs(0))))
    per_tok = {}  # (cache dtype, batch) -> {position: [s per step]}
    windowed = {}  # batch -> [s per step] at the far position, every layer sliding
    dtypes = ["float32"] + ([cache_dtype] if cache_dtype not in (None, "float32") else [])
    for pb in [int(x) for x in args.pos_batches.split(",")]:
      sides = {}
      for dt in dtypes:
        for L in (args.near, args.far):
          cache = decode_cache(dcfg, pb, L + n, dt)
          sides[f"{dt} {L}"] = functools.partial(lambda c, L: jax.block_until_ready(
              decode_loop(ds, c, L, graphdef=dg, n=n)), cache, L)
      if args.sliding_window:  # the same weights, all layers but the last local
        cache = decode_cache(wcfg, pb, args.far + n, "float32")
        sides[f"window {args.far}"] = functools.partial(lambda c: jax.block_until_ready(
            decode_loop(ds, c, args.far, graphdef=wg, n=n)), cache)
      for f in sides.values():  # compile, untimed
        f()
      t = common.alternate(sides, args.pos_runs)
      for dt in dtypes:
        per_tok[dt, pb] = {L: [x / n for x in t[f"{dt} {L}"]] for L in (args.near, args.far)}
      if args.sliding_window:
        windowed[pb] = [x / n for x in t[f"window {args.far}"]]
    bandwidth = read_bandwidth()
    run.mark("after the position loops")

    # A long request that stops early: the windowed cache against one sized for all of it.
    long_t = {}
    if args.long_new:
      long_sp = SamplingParams(max_new_tokens=args.long_new)
      full = Sampler(graphdef, state, eos_id=NO_EOS, cache_dtype=cache_dtype, min_window=0)
      first = lambda s: next(iter(s.stream(prompts, long_sp, chunk=args.new)))
      same_long = first(full) == first(sampler)
      long_t = common.alternate({"windowed": lambda: first(sampler),
                                 "full": lambda: first(full)}, args.runs)
      run.mark("after the long-request runs")

    run.row("model", f"vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, "
                     f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv, f32, "
                     f"scan_layers={cfg.scan_layers}, {cfg.num_params() / 1e6:.2f}M params")
    run.row("devices", f"jax {jax.devices()[0].device_kind} x{jax.device_count()}, "
                       f"torch threads {threads}, HF generate with its KV cache and SDPA")
    run.row("batch", f"{args.batch} prompts of {min(map(len, prompts))}-"
                     f"{max(map(len, prompts))} tokens x {args.new} new, greedy")
    run.row("greedy agreement ours/HF",
            f"{agreement(ours, theirs):.1%} of tokens before the first difference; rows "
            f"identical: {sum(a == b for a, b in zip(ours, theirs))}/{args.batch}")
    run.row("our compile + first run s", f"{compile_s:.2f}")
    run.row("our run s", common.summary(times["ours"]))
    run.row("HF run s", common.summary(times["hf"]))
    run.row("plain sampler run s", common.summary(times["plain"]) +
            f" (f32 cache, one window; greedy tokens {'equal' if same_plain else 'DIFFER'})")
    run.row("plain / ours", f"{min(times['plain']) / ot:.2f}x by min")
    run.check(*common.sanity("HF generate", ht, estimate))
    run.row("our tokens/s (best run)", f"{tokens / ot:,.0f}")
    run.row("HF tokens/s (best run)", f"{tokens / ht:,.0f}")
    run.row("speed-up ours/HF", f"{ht / ot:.2f}x by min, "
            f"{np.median(times['hf']) / np.median(times['ours']):.2f}x by median "
            "(target >= 3x)")
    for (dt, pb), by_pos in per_tok.items():
      for L in (args.near, args.far):
        run.row(f"decode ms/step at pos {L}, batch {pb}, {dt} cache",
                common.summary(by_pos[L], "ms", 1e3))
      near = min(by_pos[args.near])
      more = cache_bytes(dcfg, pb, args.far + n, dt) - cache_bytes(dcfg, pb, args.near + n, dt)
      run.row(f"decode cost pos {args.far} / pos {args.near}, batch {pb}, {dt} cache",
              f"{min(by_pos[args.far]) / near:.2f} by min (target <= 1.5); floor "
              f"{(near + more / bandwidth) / near:.2f}: the pos-{args.near} step plus reading "
              f"{more / 1e6:.1f} MB more cache at {bandwidth / 1e9:.1f} GB/s")
    for pb, w in windowed.items():
      full = per_tok["float32", pb][args.far]
      run.row(f"decode ms/step at pos {args.far}, batch {pb}, window {args.sliding_window}",
              common.summary(w, "ms", 1e3) + f"; full cache / window {min(full) / min(w):.2f}x "
              f"by min, {np.median(full) / np.median(w):.2f}x by median")
    for pb in [int(x) for x in args.pos_batches.split(",")]:
      if len(dtypes) > 1:
        a, b = per_tok["float32", pb], per_tok[dtypes[1], pb]
        run.row(f"f32 / {dtypes[1]} cache ms/step, batch {pb}",
                ", ".join(f"pos {L}: {min(a[L]) / min(b[L]):.2f}x" for L in a) + " by min")
    if long_t:
      run.row(f"first {args.new} of {args.long_new} new, windowed s",
              common.summary(long_t["windowed"]))
      run.row(f"first {args.new} of {args.long_new} new, full cache s",
              common.summary(long_t["full"]))
      run.row("full-cache greedy tokens", "equal" if same_long else "DIFFER")
      run.row("full / windowed", f"{min(long_t['full']) / min(long_t['windowed']):.2f}x by min, "
              f"{np.median(long_t['full']) / np.median(long_t['windowed']):.2f}x by median")
    run.data.update(ours_s=times["ours"], hf_s=times["hf"], hf_estimate_s=estimate,
                    read_bandwidth_bytes_s=bandwidth,
                    long_request_s=long_t,
                    decode_s_per_step={f"{dt} {b}": {str(L): v for L, v in d.items()}
                                       for (dt, b), d in per_tok.items()})


if __name__ == "__main__":
  main()
