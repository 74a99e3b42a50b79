"""Compile time of the model's programs with the layers under a scan and unrolled.

For a preset (default smollm2_135m: 30 layers), lowers and compiles from shapes alone (no weights
are made) and reports seconds per program and layout:
  forward      logits of a [B, T] batch
  train grad   value_and_grad of a mean log-likelihood over the same batch (what the trainer
               differentiates), with the config's remat policy
  decode step  one cached token for B rows against a cache of S slots
Each program is compiled `--repeats` times in fresh jit wrappers (XLA's persistent cache is off,
so nothing is reused), the layouts alternating, and the minimum is printed beside the median,
with the load before and after (benchmarks/common.py).

  python benchmarks/compile_time.py [--preset smollm2_135m] [--batch 2] [--length 256]
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

common.one_cpu_device()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stable_alignment_jax.model import llama, presets  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


def programs(cfg, batch: int, length: int, slots: int):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  def grad(state, tokens):
    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens)[0]
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.value_and_grad(loss)(state)

  cache = jax.eval_shape(lambda: llama.init_cache(cfg, batch, slots))

  def decode(state, tok, cache, slot):
    key_mask = jnp.arange(slots)[None, :] <= slot
    key_mask = jnp.broadcast_to(key_mask, (batch, slots))
    return nnx.merge(graphdef, state)(tok, positions=jnp.full((batch, 1), slot),
                                      key_mask=key_mask, cache=cache, cache_index=slot)

  tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  slot = jax.ShapeDtypeStruct((), jnp.int32)
  return {"forward": (forward, (state, tokens)), "train grad": (grad, (state, tokens)),
          "decode step": (decode, (state, tok, cache, slot))}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="smollm2_135m")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--slots", type=int, default=512, help="decode cache length")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--remat", default="dots")
  ap.add_argument("--json", default="", help="also write the figures here")
  args = ap.parse_args()
  base = presets.preset(args.preset, dtype="float32", remat=args.remat)
  with common.Run("compile_time", args.json) as run:
    results = {}
    for rep in range(args.repeats):
      for scan in ((True, False) if rep % 2 == 0 else (False, True)):  # alternate the layouts
        cfg = dataclasses.replace(base, scan_layers=scan)
        for name, (fn, fargs) in programs(cfg, args.batch, args.length, args.slots).items():
          t0 = time.perf_counter()
          jax.jit(fn).lower(*fargs).compile()  # a fresh wrapper: nothing cached in-process
          results.setdefault((name, scan), []).append(time.perf_counter() - t0)
    run.row("model", f"{args.preset}: {base.n_layers} layers, dim {base.dim}, vocab "
                     f"{base.vocab_size}; B={args.batch}, T={args.length}, decode cache "
                     f"{args.slots} slots, remat {args.remat}")
    for name in ("forward", "train grad", "decode step"):
      sc, un = results[(name, True)], results[(name, False)]
      run.row(f"{name} compile, scan", common.summary(sc))
      run.row(f"{name} compile, unrolled", common.summary(un))
      run.row(f"{name} unrolled / scan", f"{min(un) / min(sc):.1f}x by min")
    run.data["seconds"] = {f"{n}/{'scan' if s else 'unrolled'}": v
                           for (n, s), v in results.items()}


if __name__ == "__main__":
  main()
