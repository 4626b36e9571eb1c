"""Launched by test_runtime.py under torchrun: initialise at TP=2 and all-reduce the ranks."""

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megatron_v4

layout = megatron_v4.initialize(tp=2)
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
print(f"rank {dist.get_rank()} tp_rank {parallel_state.get_tensor_model_parallel_rank()} "
      f"tp_sum {int(total.item())} backend {layout.backend}", flush=True)
megatron_v4.destroy()
