"""What a rank of a parallel layout holds, described from Megatron-Core's own markers.

Shared by the rank functions of the layout and parallel tests (dsv4_layout_ranks,
dsv4_parallel_ranks, bridge_layout_ranks, parallel_gpt): local parameter name ->
the one-rank model's name, and this rank's slice of a full tensor (and back) by the
partition attributes Megatron-Core puts on its tensor-parallel parameters. Written
independently of the bridge's rules.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def global_name(name: str, global_layer: Callable[[int], int], num_experts: int | None) -> str:
    """Local name -> the one-rank model's name: decoder layer i becomes `global_layer(i)`,
    local expert j becomes j + the first expert of this expert-parallel rank."""
    match = _LAYER.match(name)
    if match:
        name = f"decoder.layers.{global_layer(int(match.group(1)))}.{match.group(2)}"
    match = _EXPERT.match(name)
    if match:
        local = num_experts // parallel_state.get_expert_model_parallel_world_size()
        first = parallel_state.get_expert_model_parallel_rank() * local
        name = f"{match.group(1)}{int(match.group(2)) + first}{match.group(3)}"
    return name


def dsv4_global_name(name: str, model) -> str:
    """`global_name` for a DeepSeekV4Model chunk (its decoder knows its pipeline layer offset)."""
    return global_name(name, lambda i: i + model.decoder.layer_offset, model.config.num_moe_experts)


def tp_group(name: str):
    """Routed experts split over the expert-tensor-parallel group, the rest over the TP group."""
    if ".mlp.experts." in name:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def is_gate_up(name: str) -> bool:
    """linear_fc1 holds [gate; up]: each rank holds its slice of both halves."""
    return name.endswith("linear_fc1.weight")


def rank_slice(tensor: torch.Tensor, full: torch.Tensor, group, gate_up: bool) -> torch.Tensor:
    """This rank's slice of a full tensor, by the partition attributes Megatron-Core sets on `tensor`."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return full
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if gate_up:
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(size, dim=tensor.partition_dim)[rank]


def gather_slices(tensor: torch.Tensor, local: torch.Tensor, group, gate_up: bool) -> torch.Tensor:
    """The full tensor from every rank's `local` slice (the inverse of `rank_slice`)."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    if gate_up:
        halves = [part.chunk(2, dim=0) for part in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(parts, dim=tensor.partition_dim)


def shard(name: str, tensor: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`rank_slice` with the group and [gate; up] rule read from a DeepSeek-V4 parameter name."""
    return rank_slice(tensor, full, tp_group(name), is_gate_up(name))


def unshard(name: str, tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`gather_slices` with the group and [gate; up] rule read from a DeepSeek-V4 parameter name."""
    return gather_slices(tensor, local, tp_group(name), is_gate_up(name))
