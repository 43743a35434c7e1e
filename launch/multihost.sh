#!/usr/bin/env bash
# Multi-host launch on plain machines (GPU clusters): run this on every host with its rank.
#   COORD=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 launch/multihost.sh python -m apr_jax.run ...
set -euo pipefail
: "${COORD:?set COORD=host:port of host 0}" "${NUM_HOSTS:?}" "${HOST_ID:?}"
export APR_JAX_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NUM_HOSTS" JAX_PROCESS_ID="$HOST_ID"
exec "$@"
