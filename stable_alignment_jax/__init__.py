"""Stable Alignment in JAX: SANDBOX simulation, SA-CPO training, and the paper's evaluations."""
