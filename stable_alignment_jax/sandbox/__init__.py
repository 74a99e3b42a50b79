"""SANDBOX: the simulated society with Back-Scatter (see DESIGN.md and configs/sandbox.py)."""
