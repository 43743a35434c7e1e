#!/usr/bin/env bash
# Multi-host (multi-process) launch: run this on every host with its rank. Every process runs
# the same command; the (data, model) mesh of --mesh spans all their devices.
#
#   GPU cluster (one process per host, each with its GPUs):
#     COORD=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 launch/multihost.sh python -m apr_jax.run --mesh 4x4 ...
#     COORD=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=1 launch/multihost.sh python -m apr_jax.run --mesh 4x4 ...
#   TPU pod slice: launch/tpu_vm.sh runs the command on every worker; JAX finds the others
#     itself (APR_JAX_DISTRIBUTED=1 without COORD).
#   CPU, two processes on one machine (what tests/test_multihost.py runs), 4 devices each:
#     XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_CPU_COLLECTIVES=gloo \
#       COORD=localhost:1234 NUM_HOSTS=2 HOST_ID=0 launch/multihost.sh python -m apr_jax.run --mesh 4x2 ...
#
# Give the KV pool an explicit size (not slots=auto): each process reads its own devices'
# free memory, and every process must compile the same program. Every process ends with the
# same results (read process 0's output); deadlines and step sizes follow process 0's clock.
set -euo pipefail
if [ -n "${COORD:-}" ]; then
  : "${NUM_HOSTS:?set NUM_HOSTS}" "${HOST_ID:?set HOST_ID (0 .. NUM_HOSTS-1)}"
  export JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NUM_HOSTS" JAX_PROCESS_ID="$HOST_ID"
fi
export APR_JAX_DISTRIBUTED=1
exec "$@"
