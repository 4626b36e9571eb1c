#!/usr/bin/env bash
# One command on a fresh machine: create .venv (Python 3.12), install megatron-v4, run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
exec .venv/bin/python examples/main_job.py "$@"
