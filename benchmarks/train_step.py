"""SA-CPO training step: our jitted JAX step vs two torch steps, the authors' loop and TRL's batch.

On the same tiny LLaMA weights and the same data (every side starts from the same weights and
is stepped on its own copy):
  * `train.train_step` at the default config (its remat policy and layer scan, f32 like torch):
    micro-batches chosen by `budget.py` from this CPU's cache (`optim.accum_steps = 0`),
    log-probs in chunks of `train.logprob_chunk` positions, and the prompt run once per example
    (`train.shared_prefix = -1`: the data's shortest prompt, here every prompt's PROMPT_LEN);
    and the same step without the shared prompt (`shared_prefix = 0`) beside it;
  * torch, the authors' style (`AlignmentTrainer`: HF `LlamaForCausalLM`, one prompt at a time,
    a separate forward per response, the CPO loss in torch, backward, AdamW step);
  * torch, batched as TRL's trainers run it: the concatenated [B*K, T] batch in one forward
    through `LlamaForCausalLM` (SDPA attention), per-sequence log-probs from the logits, the
    same CPO loss vectorised, backward, AdamW step;
  * the JAX step's model FLOP/s over the peak FLOP/s of a big f32 `jnp.dot` in this process.

All run in f32 on the CPU; torch as its users run it, threads = cores (XLA uses every core).
Each round runs every side once, in an order that reverses each round, and the big dot; the
headline uses each side's fastest round, medians beside them (benchmarks/common.py: the load
average before, between and after; the run is flagged when it was above 1.0). Each torch step is
checked against an independent figure from the same process, taken each round: 3x its forwards
alone (no autograd) plus its optimizer update. First-step losses of all sides must agree.
"6N convention" counts all parameters (the embedding gather too) as the trainer's MFU log does.
Every side's MFU counts the FLOPs of all B*K*T positions, the job the torch sides run; the
shared-prefix side runs fewer positions, so its figure is the job's rate, not its chips' work.

  python benchmarks/train_step.py [--steps 5] [--seq 256] [--json out.json]
"""

import argparse
import copy
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from benchmarks import common  # noqa: E402

common.one_cpu_device()  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import base  # noqa: E402
from stable_alignment_jax.training import budget, flops, losses, optim, train  # noqa: E402
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


def torch_batched_step(model, opt, batch, lc, grad_clip) -> float:
  """One optimizer step as TRL runs it: all B*K sequences in one forward, the loss vectorised."""
  tokens = torch.from_numpy(batch["tokens"]).long()
  b, k, t = tokens.shape
  mask = torch.from_numpy(batch["loss_mask"]).reshape(b * k, t)[:, 1:]
  opt.zero_grad(set_to_none=True)
  logits = model(input_ids=tokens.reshape(b * k, t)).logits[:, :-1]
  tok_nll = torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), tokens.reshape(b * k, t)[:, 1:].reshape(-1),
      reduction="none").reshape(b * k, t - 1)
  nll = ((tok_nll * mask).sum(-1) / mask.sum(-1)).reshape(b, k)  # mean NLL per response
  ratings = torch.from_numpy(batch["ratings"])
  best = ratings.argmax(-1)  # the first of tied maxima, as the loop picks it
  nll_best = nll.gather(1, best[:, None])
  r_best = ratings.gather(1, best[:, None])
  hinge = torch.clamp(nll_best - nll + lc.margin * (r_best - ratings) / lc.rating_scale, min=0.0)
  others = torch.ones_like(nll).scatter(1, best[:, None], 0.0)
  penalty = (hinge * others).sum(-1) / others.sum(-1).clamp(min=1.0)
  loss = (nll_best[:, 0] + lc.ratio * penalty).mean()
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  opt.step()
  return loss.item()


def torch_parts_s(model, opt, batch, batched: bool, reps: int = 2) -> float:
  """An independent estimate of a torch step: its forwards alone (inference mode, x3 for
  forward + backward) plus one optimizer update, each the best of `reps`."""
  tokens = torch.from_numpy(batch["tokens"]).long()
  b, k, t = tokens.shape
  rows = [tokens.reshape(b * k, t)] if batched else [tokens[i, j][None] for i in range(b)
                                                     for j in range(k)]
  with torch.inference_mode():
    fwd = min(common.timed(lambda: [model(input_ids=x).logits for x in rows])[0]
              for _ in range(reps))
  # An update of zero gradients costs what a real one does; weights and moments are put back
  # after, so the timed steps' trajectory stays the one the losses were checked on.
  weights = [p.detach().clone() for p in model.parameters()]
  moments = copy.deepcopy(opt.state_dict())
  for p in model.parameters():
    p.grad = torch.zeros_like(p)
  update = min(common.timed(opt.step)[0] for _ in range(reps))
  opt.zero_grad(set_to_none=True)
  with torch.no_grad():
    for p, w in zip(model.parameters(), weights):
      p.copy_(w)
  opt.load_state_dict(moments)
  return 3 * fwd + update


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
  ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step per side each)")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--responses", type=int, default=3)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  threads = common.torch_threads(torch)
  b, k, t = args.prompts, args.responses, args.seq

  cfg = preset("bench", dtype="float32")
  c = base.get_config()
  lc, oc = c.loss, c.optim
  batch = make_batch(b, k, t, cfg.vocab_size)
  losses.validate_batch(batch)

  # The same weights on every side: the torch model is saved and read by our HF importer, and
  # read back by transformers for the second torch side.
  hf = hf_model(cfg)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    # As the trainer loads it at the default config: the run's remat and layer layout (the
    # config's own fields, applied over the checkpoint's), in f32 like the torch sides.
    graphdef, params = convert.load_hf(d, dtype="float32", remat=c.model.remat,
                                       scan_layers=c.model.scan_layers)
    hf_batched = transformers.LlamaForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="sdpa").train()

  tx = optim.make_optimizer(oc, 100)[0]

  def jax_step(accum, prefix):
    return jax.jit(functools.partial(
        train.train_step, graphdef=graphdef, tx=tx, table=train.loss_table(lc, []),
        accum_steps=accum, logprob_chunk=c.train.logprob_chunk, shared_prefix=prefix),
        donate_argnums=0)

  # The default config chooses its micro-batches as the trainer does (budget.auto_accum_steps
  # on this shape and device); the whole batch in one forward is timed beside it.
  c.model = dataclasses.asdict(dataclasses.replace(cfg, remat=c.model.remat,
                                                   scan_layers=c.model.scan_layers))
  c.data.batch_size, c.data.num_responses, c.data.max_len = b, k, t
  auto, why = budget.auto_accum_steps(c, jax.make_mesh((1,), ("data",)))
  # As the trainer resolves it from the loader's shortest prompt (every prompt is PROMPT_LEN).
  prefix, prefix_why = train.shared_prefix_for(c.train.shared_prefix, PROMPT_LEN, t)
  variants = {f"jax default (accum={auto}, prefix={prefix})": jax_step(auto, prefix),
              f"jax no shared prefix (accum={auto})": jax_step(auto, 0)}
  states = {name: {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                   "step": jnp.int32(0)} for name in variants}
  jbatch = jax.tree.map(jnp.asarray, batch)

  def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps,
                             weight_decay=oc.weight_decay)

  opt, opt_batched = adamw(hf), adamw(hf_batched)

  with common.Run("train_step", args.json) as run:
    # Warm-up (compile) and a check that all compute the same loss on the same weights.
    first = {}
    for name, step in variants.items():
      t0 = time.perf_counter()
      states[name], m = step(states[name], jbatch)
      first[name] = float(m["loss"])
      run.row(f"{name} compile + first step s", f"{time.perf_counter() - t0:.1f}")
    first["torch loop"] = torch_step(hf, opt, batch, lc, oc.grad_clip)
    first["torch batched"] = torch_batched_step(hf_batched, opt_batched, batch, lc, oc.grad_clip)
    spread = max(first.values()) - min(first.values())
    run.row("first-step loss", ", ".join(f"{n} {v:.6f}" for n, v in first.items()) +
            f"; max |diff| {spread:.2e}")
    if spread > 1e-3:
      raise SystemExit(f"first-step losses differ by {spread:.2e}: the sides do not compute the "
                       "same step")
    # The torch sides' independent figures, taken each round beside the steps (min kept).
    part_fns = {"torch loop": lambda: torch_parts_s(hf, opt, batch, batched=False, reps=1),
                "torch batched": lambda: torch_parts_s(hf_batched, opt_batched, batch,
                                                       batched=True, reps=1)}
    parts = {name: [] for name in part_fns}

    peak_dot = PeakDot()
    peaks = []

    def jax_side(name):
      def run_step():
        states[name], m = variants[name](states[name], jbatch)
        jax.block_until_ready((states[name], m))
      return run_step

    sides = {name: jax_side(name) for name in variants}
    sides["torch loop"] = lambda: torch_step(hf, opt, batch, lc, oc.grad_clip)
    sides["torch batched"] = lambda: torch_batched_step(hf_batched, opt_batched, batch, lc,
                                                        oc.grad_clip)
    times = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.steps):
      for name in (names if r % 2 == 0 else names[::-1]):  # the order reverses each round
        times[name].append(common.timed(sides[name])[0])
      for name, fn in part_fns.items():
        parts[name].append(fn())
      peaks.append(peak_dot())
      run.mark(f"round {r}")

    tokens = b * k * t
    fl = model_flops(cfg, tokens, t)
    peak, pm = max(peaks), statistics.median(peaks)
    best = {name: min(v) for name, v in times.items()}
    med = {name: statistics.median(v) for name, v in times.items()}
    run.row("default micro-batches", f"{auto} ({why}); logprob_chunk {c.train.logprob_chunk}; "
            f"remat {c.model.remat}, scan_layers {c.model.scan_layers} (configs/base.py)")
    run.row("default shared prefix", f"{prefix} tokens ({prefix_why}): {flops.positions_run(b, k, t, prefix)} "
            f"of {b * k * t} positions through the layers")
    run.row("shape", f"B={b} x K={k} x T={t} = {tokens} tokens/step, f32, "
            f"{fl['n_all'] / 1e6:.2f}M params ({fl['n_mm'] / 1e6:.2f}M in matmuls)")
    run.row("devices", f"jax {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads "
            f"{threads} (= cores), {os.cpu_count()} cores; torch batched: SDPA attention")
    run.row("peak f32 jnp.dot 2048^3", f"{peak / 1e9:.1f} GFLOP/s  (median {pm / 1e9:.1f}; "
            f"all: {', '.join(f'{x / 1e9:.1f}' for x in peaks)})")
    run.row("model FLOPs/step strict", f"{fl['strict'] / 1e9:.1f} G = 6*N_mm*tok + 6*L*D*T*tok")
    for name in times:
      run.row(f"{name} step", common.summary(times[name]))
      run.row(f"{name} tokens/s", f"{tokens / best[name]:,.0f}  (median "
              f"{tokens / med[name]:,.0f})")
      run.row(f"{name} MFU strict", f"{fl['strict'] / best[name] / peak:.1%}  (medians "
              f"{fl['strict'] / med[name] / pm:.1%}; 6N convention "
              f"{fl['with_embed'] / best[name] / peak:.1%})")
    for name, est in parts.items():
      run.check(*common.sanity(name, best[name], min(est)))
    for name in variants:
      for base_name, target in (("torch loop", 1.3), ("torch batched", 1.0)):
        run.row(f"speed-up {name} / {base_name}", f"{best[base_name] / best[name]:.2f}x  "
                f"(medians {med[base_name] / med[name]:.2f}x; target >= {target}x)")
    run.data.update(times=times, first_loss=first, parts_s=parts, tokens=tokens)


if __name__ == "__main__":
  main()
