"""Which tensors of the whole model one rank holds, and which share of each.

A Megatron-Core model chunk names its tensors locally: a pipeline stage numbers
its decoder layers from 0, an expert-parallel rank numbers its experts from 0,
and a tensor-parallel rank holds a slice of a split tensor under the full
tensor's name. `rank_tensors(chunk)` lists a chunk's tensors with the conversion
plan of their global tensor (the one-rank model's) and the share they are: what
the loader reads from a checkpoint and what the exporter gathers back.

The layer numbers come from the chunk itself (each layer carries its global
`layer_number`), so any pipeline split, even or not, virtual stages included,
is followed without recomputing it here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bridge.conversion_plan import ConversionPlan, RankPosition, Slice, TensorPlan, experts_per_rank

DECODER_LAYER = "decoder.layers."


@dataclass(frozen=True)
class RankTensor:
    """One tensor a chunk holds: its local name, the plan of its global tensor, its share."""

    local_name: str
    plan: TensorPlan
    slice: Slice

    @property
    def global_name(self) -> str:
        return self.plan.mcore


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def model_chunks(model) -> list[torch.nn.Module]:
    """A model (one chunk) or a list of virtual-pipeline chunks, unwrapped."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [unwrap(chunk) for chunk in chunks]


def rank_tensors(
    chunk: torch.nn.Module, plan: ConversionPlan, num_experts: int, ranks: RankPosition
) -> Iterator[tuple[RankTensor, torch.Tensor]]:
    """(what it is, the tensor itself) for every parameter and buffer of one unwrapped model chunk."""
    per_rank = experts_per_rank(num_experts, ranks.ep_size) if num_experts else 0
    for local_name, tensor in chunk.state_dict(keep_vars=True).items():
        if local_name.endswith("_extra_state"):
            continue
        local = plan.tensor(local_name)
        values = {}
        if local.match.rule.mcore.startswith(DECODER_LAYER):
            values["layer"] = chunk.decoder.layers[local.match.values["layer"]].layer_number - 1
        if local.sharding.by_expert:
            values["expert"] = local.match.values["expert"] + ranks.ep_rank * per_rank
        tensor_plan = plan.renumbered(local, **values) if values else local
        yield RankTensor(local_name, tensor_plan, tensor_plan.share(ranks)), tensor
