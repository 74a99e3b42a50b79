"""The decoder of every family, its attention ops and KV cache, sizes, logical axes, the mesh and
logical-axis rules (sharding.py), and HF / GGUF weight conversion. Imports nothing else of ours."""
