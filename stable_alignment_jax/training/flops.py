"""FLOPs of a training step and the chips they run on: one table for the trainer's MFU and the
planner's step-time estimate, so the two never disagree about a chip's peak."""

import dataclasses

from stable_alignment_jax.model.presets import ModelConfig


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str  # what `jax.devices()[0].device_kind` contains on this chip
  peak_bf16: float  # FLOP/s
  hbm: float  # bytes
  link: float  # bytes/s one chip can send in a collective (ICI / NVLink), approximate


# Peak dense bf16 FLOP/s from the vendors' spec sheets; HBM per chip; collective bandwidth per
# chip (v4 ICI 2.4 Tb/s, v5p ICI 4.8 Tb/s, v5e 1.6 Tb/s, v6e 3.6 Tb/s, H100 SXM NVLink 900 GB/s
# and A100 600 GB/s both ways) - approximate.
CHIPS = {
    "v4": Chip("TPU v4", "TPU v4", 275e12, 32e9, 300e9),
    "v5p": Chip("TPU v5p", "TPU v5p", 459e12, 95e9, 600e9),
    "v5e": Chip("TPU v5e", "TPU v5 lite", 197e12, 16e9, 200e9),
    "v6e": Chip("TPU v6e", "TPU v6 lite", 918e12, 32e9, 448e9),
    "h100": Chip("H100 SXM", "H100", 989e12, 80e9, 450e9),
    "h200": Chip("H200 SXM", "H200", 989e12, 141e9, 450e9),  # H100's compute, 141 GB HBM3e
    "a100": Chip("A100", "A100", 312e12, 80e9, 300e9),
}


def peak_flops(device_kind: str) -> float:
  """Peak bf16 FLOP/s of the chip a JAX device kind names; 0.0 for chips not in the table."""
  return next((c.peak_bf16 for c in CHIPS.values() if c.device_kind in device_kind), 0.0)


def positions_run(b: int, k: int, t: int, shared_prefix: int = 0) -> int:
  """Positions a [B, K, T] step sends through the layers: with a shared prefix of P tokens
  (`train.shared_prefix`) each example runs its prompt once and its K response tails, P + K*(T-P)."""
  p = shared_prefix if k > 1 else 0
  return b * (p + k * (t - p))


def step_flops(cfg: ModelConfig, tokens: int, seq: int, *, reference: bool,
               frozen_base: bool = False) -> tuple[float, float]:
  """(model FLOPs as MFU counts them, FLOPs the hardware executes incl. recompute) per step.

  PaLM (Chowdhery et al. 2022, app. B): 6 N per token for the weights plus 12 L D T for the
  attention scores and mixing, forward and backward (a third of each is the forward). D there is
  the attention width H*E (Gemma's 2048 beside a model dim of 2304), and T the keys a query
  reads: a sliding layer's window when it is shorter than the sequence (Gemma, Mistral).
  Soft-capping (Gemma 2) is elementwise on the scores and logits, like the softmax and the masks
  the formula leaves out, so it adds no model FLOPs.
  frozen_base (LoRA): the base weights get no gradient, so the backward pass skips their
  weight-gradient matmuls: 4 N per token instead of 6 N (the rank-r adapters are left out).
  """
  # The embedding lookup is not a matmul, the LM head is: a tied head is the same table used
  # as a matmul, so only an untied model has a lookup-only table to leave out.
  n = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
  keys = sum(min(seq, cfg.sliding_window) if cfg.is_sliding(i) else seq
             for i in range(cfg.n_layers))  # summed over layers
  weights, attn = (4 if frozen_base else 6) * n * tokens, 12 * cfg.n_heads * cfg.head_dim * keys * tokens
  recompute = {"none": 0.0, "dots": attn / 3, "full": (weights + attn) / 3}[cfg.remat]
  ref = (weights + attn) / 3 if reference else 0.0  # the frozen reference forward (DPO)
  return weights + attn + ref, weights + attn + ref + recompute
