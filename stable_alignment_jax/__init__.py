"""Stable Alignment in JAX: SANDBOX simulation, SA-CPO training, and the paper's evaluations."""

from stable_alignment_jax import runtime as _runtime

_runtime.set_xla_flags()  # before any backend starts: see runtime.CPU_XLA_FLAGS
