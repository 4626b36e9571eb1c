"""Rank function for tests/test_bridge_layouts.py: load a checkpoint into a parallel layout, export it back.

What each rank holds is described independently of the bridge's rules: global
layer numbers from the layers themselves, expert offsets from the expert-parallel
rank, slices from the partition attributes Megatron-Core puts on its parallel
parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import megatron_v4
from bridge import AutoBridge
from bridge.hf_source import HFSource
from layout_slicing import global_name, is_gate_up, tp_group


def _global_name(name: str, chunk, num_experts: int) -> str:
    return global_name(name, lambda i: chunk.decoder.layers[i].layer_number - 1, num_experts)


def _slice_description(name: str, tensor: torch.Tensor) -> tuple | None:
    """(dim, rank, size, [w1; w3] halves split separately) or None for a whole tensor."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return None
    group = tp_group(name)
    return tensor.partition_dim, dist.get_rank(group), dist.get_world_size(group), is_gate_up(name)


def _count_checkpoint_reads() -> dict:
    """Record the elements every checkpoint read returns (sliced reads and whole-tensor reads)."""
    counts = {"sliced": 0, "whole": 0}
    sliced, whole = HFSource.read_share, HFSource.read

    def sliced_read(self, official, *args):
        tensor = sliced(self, official, *args)
        counts["sliced"] += tensor.numel()
        return tensor

    def whole_read(self, official):
        values, scale = whole(self, official)
        counts["whole"] += values.numel()
        return values, scale

    HFSource.read_share, HFSource.read = sliced_read, whole_read
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
        export_rank0 = dict(bridge.export_hf_weights(chunks, ranks="rank0"))
        export_in_source_naming = dict(bridge.export_hf_weights(chunks, naming=bridge.naming, ranks="rank0"))
        bridge.save_hf_pretrained(chunks, save_dir)
        for chunk in chunks:
            chunk.eval()
        logits = megatron_v4.forward_logits(chunks, token_ids)
        return dict(held=held, reads=reads, export_all=export_all, export_rank0=export_rank0,
                    export_in_source_naming=export_in_source_naming, logits=logits)
    finally:
        megatron_v4.destroy()
