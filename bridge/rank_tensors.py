"""Which tensors of the whole model one rank holds, and which slice of each.

A Megatron-Core model chunk names its tensors locally: a pipeline stage numbers
its decoder layers from 0, an expert-parallel rank numbers its experts from 0,
and a tensor-parallel rank holds a slice of a split tensor under the full
tensor's name. `rank_tensors(chunk)` lists a chunk's tensors with their global
name (the one-rank model's name) and the slice they are: what the loader reads
from a checkpoint and what the exporter gathers back.

The layer numbers come from the chunk itself (each layer carries its global
`layer_number`), so any pipeline split, even or not, virtual stages included,
is followed without recomputing it here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bridge.mcore_naming import MCoreNaming, RuleMatch, Sharding
from bridge.pipeline import RankPosition

DECODER_LAYER = "decoder.layers."


@dataclass(frozen=True)
class Slice:
    """This rank's share of a tensor: part `rank` of `size` along `dim`.

    With `glu`, the tensor is [w1; w3] and each half is split on its own, so the
    share is [w1 part; w3 part]. `dim=None` (or `size=1`) is the whole tensor.
    """

    dim: int | None = None
    rank: int = 0
    size: int = 1
    glu: bool = False

    @property
    def whole(self) -> bool:
        return self.dim is None or self.size == 1


@dataclass(frozen=True)
class RankTensor:
    """One tensor a chunk holds: its local name, its global rule match, its slice."""

    local_name: str
    match: RuleMatch
    slice: Slice

    @property
    def global_name(self) -> str:
        return self.match.mcore_name


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def model_chunks(model) -> list[torch.nn.Module]:
    """A model (one chunk) or a list of virtual-pipeline chunks, unwrapped."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [unwrap(chunk) for chunk in chunks]


def slice_of(sharding: Sharding, ranks: RankPosition) -> Slice:
    """The slice a rank holds of a tensor split by `sharding` (routed experts split over the ETP group)."""
    if sharding.dim is None:
        return Slice()
    if sharding.by_expert:
        return Slice(sharding.dim, ranks.etp_rank, ranks.etp_size, sharding.glu)
    return Slice(sharding.dim, ranks.tp_rank, ranks.tp_size, sharding.glu)


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    if num_experts % ep_size:
        divisors = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(f"{num_experts} routed experts do not divide over ep={ep_size} ranks; use ep in {divisors}")
    return num_experts // ep_size


def rank_tensors(
    chunk: torch.nn.Module, mcore: MCoreNaming, num_experts: int, ranks: RankPosition
) -> Iterator[tuple[RankTensor, torch.Tensor]]:
    """(what it is, the tensor itself) for every parameter and buffer of one unwrapped model chunk."""
    per_rank = experts_per_rank(num_experts, ranks.ep_size) if num_experts else 0
    for local_name, tensor in chunk.state_dict(keep_vars=True).items():
        if local_name.endswith("_extra_state"):
            continue
        match = mcore.from_mcore(local_name)
        values = dict(match.values)
        if match.rule.mcore.startswith(DECODER_LAYER):
            values["layer"] = chunk.decoder.layers[values["layer"]].layer_number - 1
        if match.rule.sharding.by_expert:
            values["expert"] += ranks.ep_rank * per_rank
        entry = RankTensor(local_name, RuleMatch(match.rule, values), slice_of(match.rule.sharding, ranks))
        yield entry, tensor


def take_slice(tensor: torch.Tensor, part: Slice, name: str) -> torch.Tensor:
    """`part` of one full official tensor (a view); a [w1; w3] tensor is read as its two halves instead."""
    if part.glu:
        raise ValueError(f"{name}: a glu slice spans w1 and w3; slice each of them")
    if part.whole:
        return tensor
    length = check_divides(tensor.shape[part.dim], part, name)
    return tensor.narrow(part.dim, part.rank * length, length)


def check_divides(extent: int, part: Slice, name: str) -> int:
    """The length of one rank's piece of `extent`; a clear error when it does not divide."""
    if extent % part.size:
        divisors = [n for n in range(1, extent + 1) if extent % n == 0]
        raise ValueError(
            f"{name}: {extent} rows/columns along dim {part.dim} do not divide over {part.size} ranks; "
            f"use a parallel size in {divisors}"
        )
    return extent // part.size
