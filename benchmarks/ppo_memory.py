"""Compiled temporary memory of a PPO update step and a preference step, by log-prob chunk.

XLA's own figure for a jitted step, `jax.jit(step).lower(...).compile().memory_analysis()
.temp_size_in_bytes`: the scratch a step needs beside its inputs and outputs, where the whole
[N, T, V] f32 logits, their softmax and their gradient live when nothing is chunked. Nothing runs;
only the compiler is asked, so the figures do not depend on the machine's load.

Steps, on a small LLaMA (the `tiny` preset: dim 64, 2 layers) with a 32k vocabulary, f32:
  * PPO update: one optimizer step of `ppo.update` (one epoch, one minibatch of --rows rows of
    --seq tokens): the policy forward, the clipped surrogate and value losses, backward, AdamW;
  * PPO experience: the rollout forward (policy log-probs and values, reference log-probs);
  * preference: `train.train_step` of SA-CPO on [--rows / 2, 2, --seq] (two responses a prompt).
Each at train.logprob_chunk = 0 (the whole logits) and the chunks given. Also XLA's flop count,
which counts a loop body once: a chunked step's figure is one chunk's head, not the whole step's,
so flops compare between trees at the same chunk, never between chunks.

The script uses only APIs that main had before the log-prob path was unified, so the same file
measures an older tree: `PYTHONPATH=<tree> python benchmarks/ppo_memory.py`.

  python benchmarks/ppo_memory.py [--seq 512] [--rows 4] [--chunks 0,16,64] [--json out.json]

Expected: with L = N * T * V * 4 bytes, an unchunked step holds several L at once (the logits,
their exp / softmax and the gradient of the logits), a chunked one the same for one chunk of
`chunk_plan(T-1, chunk)` positions, L * size / T; the rest of the step (layers, head weights,
optimizer) is the same in both. So temp(0) / temp(c) ~ (k L + R) / (k L size / T + R).

Measured (XLA:CPU, jax 0.10.2, N=4, T=512, V=32000, L = 249.5 MiB; MiB of temp):
                      before (main ad6a1c9)     after (one path)
  ppo_update     c=0       1052.0 (4.22 L)      802.5 (3.22 L)
                 c=64       152.4                151.7
  ppo_experience c=0        499.6 (2.00 L)      499.5 (2.00 L)
                 c=64        63.5                 32.3
  preference     c=0        804.0 (3.22 L)      804.0 (3.22 L)
                 c=64       159.2                159.2
With c=64 (the default config's), 511 positions are 8 chunks of 64: k = 3 gives
(3 L + R) / (3 L / 8 + R) with R ~ 0.2 L, i.e. ~5.5x; the update step measures 5.3x.
"""

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from stable_alignment_jax.training import optim, ppo, train
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset


def _compiled(fn, *args):
  c = jax.jit(fn).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"temp_bytes": int(c.memory_analysis().temp_size_in_bytes),
          "flops": float(cost.get("flops", 0.0))}


def measure(seq: int, rows: int, vocab: int, chunks: list[int]) -> dict:
  cfg = preset("tiny", vocab_size=vocab, dtype="float32", max_seq_len=max(seq, 64))
  graphdef, policy = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  ref = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(1)))[1]
  params = {"policy": policy, "value_head": {"w": jnp.zeros(cfg.dim), "b": jnp.zeros(())}}
  tx = optim.make_optimizer(base.get_config().optim, 10)[0]
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "frozen": ref}
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, vocab, (rows, seq)), jnp.int32)
  mask = jnp.asarray(np.concatenate([np.zeros((rows, seq // 4)),
                                     np.ones((rows, seq - 1 - seq // 4))], 1), jnp.float32)
  f = jnp.zeros((rows, seq - 1), jnp.float32)
  rollout = {"tokens": tokens, "mask": mask, "old_logp": f, "old_values": f, "advantages": f,
             "returns": f}
  pref = {"tokens": tokens.reshape(rows // 2, 2, seq),
          "loss_mask": jnp.pad(mask, ((0, 0), (1, 0))).reshape(rows // 2, 2, seq),
          "ratings": jnp.asarray([[5.0, 2.0]] * (rows // 2)),
          "response_mask": jnp.ones((rows // 2, 2))}
  lc = {"name": "sa_cpo", "ratio": 0.2, "margin": 10.0, "rating_scale": 7.0,
        "aggregate": "mean", "hinge": "per_pair"}
  table = train.loss_table(lc, [])
  out = {}
  for chunk in chunks:
    update = functools.partial(
        ppo.update, graphdef=graphdef, tx=tx, epochs=1, minibatch=rows,
        loss_kw=dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, logprob_chunk=chunk))
    exp = functools.partial(ppo.experience, graphdef=graphdef, gamma=1.0, lam=0.95,
                            cliprange_reward=10.0, chunk=rows, logprob_chunk=chunk)
    pstep = functools.partial(train.train_step, graphdef=graphdef, tx=tx, table=table,
                              accum_steps=1, logprob_chunk=chunk)
    pstate = {"params": policy, "opt_state": tx.init(policy), "step": jnp.int32(0)}
    out[chunk] = {
        "ppo_update": _compiled(update, state, rollout, jax.random.key(0)),
        "ppo_experience": _compiled(exp, params, ref, tokens, mask, jnp.zeros(rows),
                                    jnp.float32(0.1)),
        "preference_step": _compiled(pstep, pstate, pref)}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--rows", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--chunks", default="0,16,64")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  chunks = [int(x) for x in args.chunks.split(",")]
  res = measure(args.seq, args.rows, args.vocab, chunks)
  whole = args.rows * (args.seq - 1) * args.vocab * 4
  print(f"tree {os.path.dirname(os.path.abspath(train.__file__))}; N={args.rows} rows, "
        f"T={args.seq}, V={args.vocab}: whole f32 logits L = {whole / 2**20:.1f} MiB")
  for step in ("ppo_update", "ppo_experience", "preference_step"):
    base = res[chunks[0]][step]["temp_bytes"]
    for chunk in chunks:
      r = res[chunk][step]
      print(f"  {step:16s} logprob_chunk={chunk:3d}: temp {r['temp_bytes'] / 2**20:8.1f} MiB "
            f"({r['temp_bytes'] / whole:5.2f} L; {base / max(r['temp_bytes'], 1):5.2f}x less than "
            f"chunk {chunks[0]}), {r['flops'] / 1e9:7.2f} GFLOP")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"args": vars(args), "whole_logits_bytes": whole,
                 "results": {str(k): v for k, v in res.items()}}, fh, indent=1)


if __name__ == "__main__":
  main()
