"""Process setup every entry point does first: the distributed runtime and the compilation
cache. Imports no jax at module level, so an entry point can call these before jax starts."""

import os


def init_distributed():
  """jax.distributed from the environment, when it names a multi-process run (a no-op on one
  host); must run before anything touches a device."""
  import jax
  # SA_DISTRIBUTED=1 (set by launch/tpu_pod.sh): a pod slice, where jax finds the coordinator
  # from the TPU metadata even when no variable below is set.
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") or \
     os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or \
     os.environ.get("SA_DISTRIBUTED") == "1":
    kw = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
      kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)


def enable_compilation_cache():
  """Compiled programs persist across runs (a resumed or next-stage run skips recompiling);
  $JAX_COMPILATION_CACHE_DIR, when set, wins."""
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser("~/.cache/stable_alignment_jax/jax"))
