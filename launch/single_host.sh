#!/usr/bin/env bash
# One host, all its accelerators (a TPU VM, a GPU box, or the CPU): no distributed runtime.
#   launch/single_host.sh [--dry-run] -- python -m stable_alignment_jax.main --config=configs/stage3.py
#   launch/single_host.sh -- python -m stable_alignment_jax.recipes.pipeline --config=configs/pipeline.py:tiny
set -euo pipefail
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "give the command after --" >&2; exit 2; }
cd "$(dirname "$0")/.."
[[ -f .venv/bin/activate ]] && . .venv/bin/activate
# Unset multi-host variables so main.py does not try to join a cluster.
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
echo "single host: $(hostname), command: $*"
echo "+ $*"
if [[ $DRY == 0 ]]; then exec "$@"; fi
