#!/usr/bin/env bash
# Warm start: cut a small DeepSeek-V4 out of a bigger one, train what the cut changed, export it.
#
#   examples/warm_start.sh [WORK_DIR]        # CPU, a tiny "big" model, about a minute
#
# 1. a tiny random "big" checkpoint (8 layers, 8 experts; byte vocabulary) and a smaller config;
# 2. python -m bridge slice: 4 of its layers by stride, the 4 experts of each layer with the largest
#    gate rows, plus provenance.json and frozen_keys.json (the tensors copied unchanged);
# 3. python -m bridge import, then pretrain.py --load on a text file with --freeze-file frozen_keys.json
#    (only the SLICE and INIT tensors train);
# 4. python -m bridge export: the trained slice as an official Hugging Face checkpoint.
# With a real model, step 1 is the released checkpoint and step 2's --config your smaller config.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - "$work" <<'PY'
import sys

from bridge.hf_config import write_official_config
from bridge.tiny import make_tiny_checkpoint, tiny_config

work = sys.argv[1]
big = tiny_config(vocab_size=320, num_layers=8, compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0),
                  num_routed_experts=8, num_hash_layers=2)
small = tiny_config(vocab_size=320, num_layers=4, compress_ratios=(0, 4, 128, 0), num_routed_experts=4,
                    num_hash_layers=1)
make_tiny_checkpoint(f"{work}/big", cfg=big, seed=1)
write_official_config(small, f"{work}/small")
with open(f"{work}/corpus.txt", "w") as f:
    f.write("\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
PY

"$PYTHON" -m bridge slice --hf "$work/big" --config "$work/small/config.json" --out "$work/slice" --force
"$PYTHON" -m bridge import --hf "$work/slice" --out "$work/import" --dtype fp32 --force --quiet
"$PYTHON" examples/pretrain.py --load "$work/import" --save "$work/run" \
    --freeze-file "$work/slice/frozen_keys.json" --text-file "$work/corpus.txt" \
    --train-iters 20 --seq-length 32 --micro-batch-size 2 --global-batch-size 4
"$PYTHON" -m bridge export --mcore "$work/run" --out "$work/trained" --force --quiet
echo "trained slice: $work/trained (provenance: $work/slice/provenance.json)"
