"""SA-CPO training step: our jitted JAX step vs a torch step in the style of the authors' release.

Issue 4 asks for, on the same tiny LLaMA weights and the same data:
  * tokens/s of `train.train_step` (one jit, [B*K, T] in one forward) against a straightforward
    torch loop like the authors' `AlignmentTrainer` (HF `LlamaForCausalLM`, one prompt at a time,
    a separate forward per response, the CPO loss in torch, backward, AdamW step);
  * the JAX step's model FLOP/s over the peak FLOP/s of a big f32 `jnp.dot` in this process.

Both sides run in f32 on the CPU with the same thread budget (torch.set_num_threads(2); XLA uses
the 2 cores of this machine). Each round times one jax step, one torch step and the big dot, so
a change in machine load (the machine is shared) hits all three alike. Load only ever adds time,
so the headline figures use each side's fastest round; the medians are printed beside them.
"6N convention" counts all parameters (the embedding gather too) as the trainer's MFU log does.

  python benchmarks/train_step.py [--steps 5] [--seq 256]
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

# One CPU device: drop a forced device count (the tests set one) before jax is imported.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import base  # noqa: E402
from stable_alignment_jax import losses, optim, train  # noqa: E402
from stable_alignment_jax.model import convert  # noqa: E402
from stable_alignment_jax.model.presets import preset  # noqa: E402

PROMPT_LEN = 64  # prompt tokens of every example; the rest of T is the response


def hf_model(cfg) -> transformers.LlamaForCausalLM:
  hc = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hc).float().train()


def make_batch(b, k, t, vocab, seed=0) -> dict[str, np.ndarray]:
  """Every response fills T (no padding), so both sides process exactly B*K*T tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(b, k, t)).astype(np.int32)
  tokens[:, :, :PROMPT_LEN] = tokens[:, :1, :PROMPT_LEN]  # the K responses share the prompt
  loss_mask = np.zeros((b, k, t), np.float32)
  loss_mask[:, :, PROMPT_LEN:] = 1.0
  ratings = rng.integers(1, 8, size=(b, k)).astype(np.float32)
  return {"tokens": tokens, "loss_mask": loss_mask, "ratings": ratings,
          "response_mask": np.ones((b, k), np.float32)}


# --- torch, the authors' style ----------------------------------------------------------------

def torch_cpo(nll: torch.Tensor, ratings: list[float], lc) -> torch.Tensor:
  """SA-CPO for one prompt (paper form, hinge per pair, mean), as the authors write it: a loop."""
  best = max(range(len(ratings)), key=lambda i: (ratings[i], -i))  # ties: the first
  hinges = [torch.clamp(nll[best] - nll[i] + lc.margin * (ratings[best] - ratings[i])
                        / lc.rating_scale, min=0.0)
            for i in range(len(ratings)) if i != best]
  penalty = torch.stack(hinges).mean() if hinges else nll.new_zeros(())
  return nll[best] + lc.ratio * penalty


def torch_step(model, opt, batch, lc, grad_clip) -> float:
  """One optimizer step over B prompts: per prompt, K separate forwards, loss/B, backward."""
  tokens = torch.from_numpy(batch["tokens"]).long()
  labels = tokens.clone()
  labels[torch.from_numpy(batch["loss_mask"]) == 0] = -100  # prompt tokens carry no loss
  b, k, _ = tokens.shape
  opt.zero_grad(set_to_none=True)
  total = 0.0
  for i in range(b):
    nll = []
    for j in range(k):
      logits = model(input_ids=tokens[i, j][None]).logits
      nll.append(torch.nn.functional.cross_entropy(
          logits[0, :-1], labels[i, j, 1:], ignore_index=-100))
    loss = torch_cpo(torch.stack(nll), batch["ratings"][i].tolist(), lc) / b
    loss.backward()
    total += loss.item()
  torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  opt.step()
  return total


# --- FLOPs ------------------------------------------------------------------------------------

def model_flops(cfg, tokens: int, t: int) -> dict[str, float]:
  """Training FLOPs per step (forward + backward = 3x forward, 2 FLOPs per multiply-add).

  matmul weights N_mm = every parameter except the input embedding table (a gather) and the
  norm scales; attention scores and values cost 4*T*D per token per layer in the forward over
  the causal half of the T x T square, so 3 * 4 * L * D * T / 2 = 6*L*D*T per token for training.
    strict     = 6 * N_mm * tokens + 6 * L * D * T * tokens        (the headline MFU)
    with_embed = 6 * num_params * tokens + 6 * L * D * T * tokens  (counts the gather as matmul)
  """
  n_all = cfg.num_params()
  n_mm = n_all - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
  attn = 6 * cfg.n_layers * cfg.dim * t * tokens
  return {"strict": 6 * n_mm * tokens + attn, "with_embed": 6 * n_all * tokens + attn,
          "n_mm": n_mm, "n_all": n_all, "attn": attn}


class PeakDot:
  """f32 FLOP/s of an n x n @ n x n jnp.dot on this device (compiled once, timed on call)."""

  def __init__(self, n=2048):
    self.n = n
    self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self.dot = jax.jit(jnp.dot)
    self.dot(self.a, self.b).block_until_ready()

  def __call__(self, reps=3) -> float:
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      self.dot(self.a, self.b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    return 2 * self.n**3 / best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--responses", type=int, default=3)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()
  torch.set_num_threads(2)
  b, k, t = args.prompts, args.responses, args.seq

  cfg = preset("bench", dtype="float32")
  c = base.get_config()
  lc, oc = c.loss, c.optim
  batch = make_batch(b, k, t, cfg.vocab_size)
  losses.validate_batch(batch)

  # The same weights on both sides: the torch model is saved and read by our HF importer.
  hf = hf_model(cfg)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    graphdef, params = convert.load_hf(d, dtype="float32")

  tx = optim.make_optimizer(oc, 100)[0]

  def jax_step(accum):
    return jax.jit(functools.partial(
        train.train_step, graphdef=graphdef, tx=tx, loss_name="sa_cpo",
        kwargs=train.loss_kwargs(lc), accum_steps=accum), donate_argnums=0)

  # Two settings of the same jitted step: the whole [B*K, T] batch in one forward (the default
  # config), and `optim.accum_steps = B` (one prompt's K responses per scanned micro-batch: the
  # same update, but activations small enough to stay in the CPU caches).
  variants = {"jax": jax_step(1), f"jax accum={b}": jax_step(b)}
  states = {name: {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                   "step": jnp.int32(0)} for name in variants}
  jbatch = jax.tree.map(jnp.asarray, batch)
  opt = torch.optim.AdamW(hf.parameters(), lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps,
                          weight_decay=oc.weight_decay)

  # Warm-up (compile) and a check that all compute the same loss on the same weights.
  first = {}
  for name, step in variants.items():
    t0 = time.perf_counter()
    states[name], m = step(states[name], jbatch)
    first[name] = (float(m["loss"]), time.perf_counter() - t0)
  torch_loss = torch_step(hf, opt, batch, lc, oc.grad_clip)
  print("first-step loss: " + ", ".join(
      f"{name} {l:.6f} (compile+step {s:.1f}s)" for name, (l, s) in first.items())
      + f", torch {torch_loss:.6f}; max |diff| "
      f"{max(abs(l - torch_loss) for l, _ in first.values()):.2e}")

  peak_dot = PeakDot()
  times = {name: [] for name in [*variants, "torch"]}
  peaks = []
  for _ in range(args.steps):
    for name, step in variants.items():
      t0 = time.perf_counter()
      states[name], m = step(states[name], jbatch)
      jax.block_until_ready((states[name], m))
      times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    torch_step(hf, opt, batch, lc, oc.grad_clip)
    times["torch"].append(time.perf_counter() - t0)
    peaks.append(peak_dot())

  tokens = b * k * t
  fl = model_flops(cfg, tokens, t)
  peak, pm = max(peaks), statistics.median(peaks)
  best = {name: min(v) for name, v in times.items()}
  med = {name: statistics.median(v) for name, v in times.items()}
  secs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  rows = [
      ("shape", f"B={b} x K={k} x T={t} = {tokens} tokens/step, f32, "
                f"{fl['n_all'] / 1e6:.2f}M params ({fl['n_mm'] / 1e6:.2f}M in matmuls)"),
      ("devices", f"jax {jax.devices()[0].device_kind} x{jax.device_count()}, "
                  f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
                  f"load average {os.getloadavg()[0]:.1f}"),
      ("peak f32 jnp.dot 2048^3", f"{peak / 1e9:.1f} GFLOP/s  (median {pm / 1e9:.1f}; "
                                  f"all: {', '.join(f'{x / 1e9:.1f}' for x in peaks)})"),
      ("model FLOPs/step strict", f"{fl['strict'] / 1e9:.1f} G = 6*N_mm*tok + 6*L*D*T*tok"),
  ]
  for name in times:
    rows += [
        (f"{name} step s", f"best {best[name]:.3f}  median {med[name]:.3f}  "
                           f"all: {secs(times[name])}"),
        (f"{name} tokens/s", f"{tokens / best[name]:,.0f}  (median {tokens / med[name]:,.0f})"),
        (f"{name} MFU strict", f"{fl['strict'] / best[name] / peak:.1%}  (medians "
                               f"{fl['strict'] / med[name] / pm:.1%}; 6N convention "
                               f"{fl['with_embed'] / best[name] / peak:.1%}; target >= 65%)"),
    ]
  for name in variants:
    rows.append((f"speed-up {name}/torch", f"{best['torch'] / best[name]:.2f}x  (medians "
                                           f"{med['torch'] / med[name]:.2f}x; target >= 2x)"))
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
  main()
