"""The environment of a JAX subprocess a test starts (tests/ is on sys.path: `import subproc`)."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def jax_env(devices: int = 1, **extra: str) -> dict:
  """os.environ for a child JAX process: the project importable, CPU, and XLA_FLAGS rebuilt from
  the session's TEST_XLA_FLAGS (conftest) with `devices` virtual devices, instead of the
  session's 8; `extra` variables on top."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
  flags = os.environ.get("TEST_XLA_FLAGS", "").split()
  if devices != 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env
