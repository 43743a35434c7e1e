#!/usr/bin/env bash
# Tree vs dense attention on one GPU (or TPU chip) at 4k, 16k and 64k KV slots per lane:
# one decode step's attention of an 8B model's layer shape (32 q heads, 8 KV heads, head_dim
# 128, bfloat16) on a synthetic thread tree, 1 and 8 lanes, 4 and 16 threads per lane. On a
# TPU the Pallas page kernel is timed too; tree attention at blocks of 128, 512 and 2048 slots.
# About 3-6 minutes on an H100/H200.
#   launch/gpu_attention.sh [OUT_DIR]      (writes OUT_DIR/scaling_gpu.json, prints the table)
set -euo pipefail
out="${1:-.}"
mkdir -p "$out"
exec timeout 480 python -m apr_jax.bench scaling --scaling_shape 8b \
  --scaling_pools 4096,16384,65536 --scaling_threads 4,16 --scaling_lanes 1,8 \
  --scaling_blocks 128,512,2048 --prompt_tokens 2048 --own_tokens 128 --repeats 10 --out "$out/scaling_gpu.json"
