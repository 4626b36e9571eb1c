#!/usr/bin/env bash
# One command on a fresh machine: create .venv (Python 3.12), install megatron-v4, run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
.venv/bin/python examples/main_job.py "$@"
echo
echo "Next: 'source .venv/bin/activate' puts python, torchrun and dsv4-convert of this install on PATH"
echo "(the README's commands assume it); the tests: .venv/bin/python -m pytest tests -q"
