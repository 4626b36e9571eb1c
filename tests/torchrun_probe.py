"""Launched by test_runtime.py under torchrun: initialise at TP=2 and all-reduce the ranks.

Each rank writes its line to DIR/rank<N>.txt (ranks share stdout, where lines interleave).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megatron_v4

layout = megatron_v4.initialize(tp=2)
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
Path(sys.argv[1], f"rank{dist.get_rank()}.txt").write_text(
    f"rank {dist.get_rank()} tp_rank {parallel_state.get_tensor_model_parallel_rank()} "
    f"tp_sum {int(total.item())} backend {layout.backend}"
)
megatron_v4.destroy()
