#!/usr/bin/env bash
# Creates ./.venv with Python 3.12 and installs megatron-v4 (editable) with its test extra.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
    local candidates=("${PYTHON:-}" python3.12 python3 python)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$py"
            return
        fi
    done
    # pyenv with another global version: its python3.12 shim refuses to run, the install does not.
    if command -v pyenv >/dev/null 2>&1; then
        local version
        version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
        if [ -n "$version" ]; then
            echo "$(pyenv root)/versions/$version/bin/python3.12"
            return
        fi
    fi
    for py in /usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        [ -x "$py" ] && { echo "$py"; return; }
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    PY=$(find_python312) || {
        echo "error: Python 3.12 not found (megatron-core 0.19 needs it); install it or set PYTHON=/path/to/python3.12" >&2
        exit 1
    }
    echo "Using $PY"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import megatron.core, torch, transformers, megatron_v4, bridge; print(f'megatron-v4 installed: megatron-core {megatron.core.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
