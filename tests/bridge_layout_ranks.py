"""Rank function for tests/test_bridge_layouts.py: load a checkpoint into a parallel layout, export it back.

What each rank holds is described independently of the bridge's rules: global
layer numbers from the layers themselves, expert offsets from the expert-parallel
rank, slices from the partition attributes Megatron-Core puts on its parallel
parameters.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state as ps

import megatron_v4
from bridge import AutoBridge
from bridge.checkpoint_slices import HFSourceSlices
from bridge.hf_source import HFSource

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def _global_name(name: str, chunk, num_experts: int) -> str:
    match = _LAYER.match(name)
    if match:
        name = f"decoder.layers.{chunk.decoder.layers[int(match.group(1))].layer_number - 1}.{match.group(2)}"
    match = _EXPERT.match(name)
    if match:
        first = ps.get_expert_model_parallel_rank() * num_experts // ps.get_expert_model_parallel_world_size()
        name = f"{match.group(1)}{int(match.group(2)) + first}{match.group(3)}"
    return name


def _slice_description(name: str, tensor: torch.Tensor) -> tuple | None:
    """(dim, rank, size, [w1; w3] halves split separately) or None for a whole tensor."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return None
    if ".mlp.experts." in name:
        rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    else:
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return tensor.partition_dim, rank, size, name.endswith("linear_fc1.weight")


def _count_checkpoint_reads() -> dict:
    """Record the elements every checkpoint read returns (sliced reads and whole-tensor reads)."""
    counts = {"sliced": 0, "whole": 0}
    sliced, whole = HFSourceSlices.read, HFSource.read

    def sliced_read(self, official, *args):
        tensor = sliced(self, official, *args)
        counts["sliced"] += tensor.numel()
        return tensor

    def whole_read(self, official):
        values, scale = whole(self, official)
        counts["whole"] += values.numel()
        return values, scale

    HFSourceSlices.read, HFSource.read = sliced_read, whole_read
    return counts


def load_and_export(checkpoint: str, layout: dict, save_dir: str, token_ids: torch.Tensor) -> dict:
    """Parameters this rank holds (by global name, with their slice), what it read, its export, the logits."""
    megatron_v4.initialize(**layout)
    try:
        reads = _count_checkpoint_reads()
        bridge = AutoBridge.from_hf_pretrained(checkpoint)
        chunks = bridge.to_megatron_model(dtype=torch.float32)
        held = {}
        for chunk in chunks:
            for name, tensor in chunk.state_dict(keep_vars=True).items():
                if not name.endswith("_extra_state"):
                    held[_global_name(name, chunk, bridge.config.num_routed_experts)] = (
                        tensor.detach().clone(), _slice_description(name, tensor))
        export_all = dict(bridge.export_hf_weights(chunks))
        export_rank0 = dict(bridge.export_hf_weights(chunks, all_ranks=False))
        export_in_source_naming = dict(bridge.export_hf_weights(chunks, naming=bridge.naming, all_ranks=False))
        bridge.save_hf_pretrained(chunks, save_dir)
        for chunk in chunks:
            chunk.eval()
        logits = megatron_v4.forward_logits(chunks, token_ids)
        return dict(held=held, reads=reads, export_all=export_all, export_rank0=export_rank0,
                    export_in_source_naming=export_in_source_naming, logits=logits)
    finally:
        megatron_v4.destroy()
