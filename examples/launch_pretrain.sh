#!/usr/bin/env bash
# Launch examples/pretrain.py with a named parallel layout; extra arguments go to the script.
#
#   examples/launch_pretrain.sh LAYOUT [pretrain.py arguments...]
#
# Layouts (ranks = tp * pp * dp; experts split over ep ranks of the dp * tp ranks):
#   single       1 rank                     plain python, no torchrun
#   dp2          2 ranks, data parallel     --nproc-per-node 2
#   tp2          2 ranks, TP=2 + sequence parallelism (Megatron-Core's MoE needs SP with TP > 1)
#   ep2          2 ranks, EP=2 (data parallel for everything but the routed experts)
#   pp2          2 ranks, PP=2 (1F1B schedule)
#   tp2-ep2      4 ranks, TP=2 + SP, EP=2
#   tp2-ep2-pp2  8 ranks, TP=2 + SP, EP=2, PP=2
#
# Examples:
#   examples/launch_pretrain.sh single                                     # tiny model, mock data, CPU
#   examples/launch_pretrain.sh ep2 --load /ckpt/v4-mcore --data-path /data/corpus_text_document \
#       --seq-length 4096 --micro-batch-size 1 --global-batch-size 256 --train-iters 10000 \
#       --save /ckpt/run1 --save-interval 500
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT; NPROC_PER_NODE defaults to the layout's size.
set -euo pipefail

layout="${1:?usage: $0 LAYOUT [pretrain.py arguments...] (LAYOUT: single dp2 tp2 ep2 pp2 tp2-ep2 tp2-ep2-pp2)}"
shift
case "$layout" in
  single)      ranks=1; flags=() ;;
  dp2)         ranks=2; flags=() ;;
  tp2)         ranks=2; flags=(--tp 2 --sp) ;;
  ep2)         ranks=2; flags=(--ep 2) ;;
  pp2)         ranks=2; flags=(--pp 2) ;;
  tp2-ep2)     ranks=4; flags=(--tp 2 --sp --ep 2) ;;
  tp2-ep2-pp2) ranks=8; flags=(--tp 2 --sp --ep 2 --pp 2) ;;
  *) echo "unknown layout '$layout'; choose single, dp2, tp2, ep2, pp2, tp2-ep2 or tp2-ep2-pp2" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's virtual environment when set-up made one, so the script works without activating it.
default_python=python
[[ -x "$here/../.venv/bin/python" ]] && default_python="$here/../.venv/bin/python"
python="${PYTHON:-$default_python}"
if [[ "$ranks" == 1 && -z "${NNODES:-}" ]]; then
  exec "$python" "$here/pretrain.py" "${flags[@]}" "$@"
fi
exec "$python" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE:-$ranks}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  "$here/pretrain.py" "${flags[@]}" "$@"
