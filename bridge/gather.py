"""Full Megatron-Core tensors from a model split over any parallel layout, one tensor at a time.

The ranks describe what they hold (global name, slice, shape; one rank per
copy, so data-parallel replicas and the other members of a tensor-parallel group
stay silent) and exchange the descriptions once: all ranks then walk the same
catalogue of the whole model in the same order. For each tensor, the lowest
describing rank is its source: its tensor- (or expert-tensor-) parallel group
all-gathers the slices, and the full tensor goes from the source to every rank
(`ALL`: a broadcast), to rank 0 only (`RANK0`: a send), or stays on the source
(`OWNER`: each tensor appears on exactly one rank, so each pipeline stage and
expert-parallel rank yields its own part, with no traffic beyond the tensor-parallel
all-gather). Only one full tensor is in flight at a time: no rank ever holds more
of the model than its own part plus one tensor. Every rank must consume the stream
to its end, since each step is a collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge.conversion_plan import ConversionPlan, RankPosition, Slice, TensorPlan
from bridge.rank_tensors import RankTensor, rank_tensors

ALL, RANK0, OWNER = "all", "rank0", "owner"
RECEIVERS = (ALL, RANK0, OWNER)
"""Which ranks receive the gathered tensors: every rank, global rank 0, or the one rank that sources each."""

SECTIONS = ("embedding.", "decoder.layers.", "decoder.", "output_layer.", "mtp.")
"""Catalogue order, whatever the layout: by section, then layer, then rule, then expert."""


@dataclass(frozen=True)
class Holding:
    """What one rank says about one tensor it holds."""

    global_name: str
    shape: tuple[int, ...]
    dtype: str
    slice: Slice
    group: tuple[int, ...]
    """Global ranks of the group that splits it (this rank alone if it holds it whole)."""


def _group_of(entry: RankTensor):
    if entry.plan.sharding.by_expert:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _reports(entry: RankTensor, ranks: RankPosition) -> bool:
    """Whether this rank describes `entry` in the catalogue: one rank per copy of the model (data-parallel
    rank 0, first rank of its tensor-parallel group), so that the catalogue stays the model's size."""
    if entry.plan.sharding.by_expert:
        return parallel_state.get_expert_data_parallel_rank() == 0 and ranks.etp_rank == 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0 and ranks.tp_rank == 0


def _catalogue_key(tensor: TensorPlan, rule_order: dict) -> tuple:
    match = tensor.match
    section = next(i for i, prefix in enumerate(SECTIONS) if match.rule.mcore.startswith(prefix))
    values = match.values
    return section, values.get("layer", values.get("mtp", 0)), rule_order[match.rule], values.get("expert", 0)


def _receive_buffer(holding: Holding) -> torch.Tensor:
    """An empty full tensor to receive `holding` into, where the backend communicates (GPU for NCCL)."""
    shape = list(holding.shape)
    if not holding.slice.whole:
        shape[holding.slice.dim] *= holding.slice.size
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.empty(shape, dtype=getattr(torch, holding.dtype.removeprefix("torch.")), device=device)


def gather_full_tensors(
    chunks: list[torch.nn.Module], plan: ConversionPlan, num_experts: int, receivers: str = ALL
) -> Iterator[tuple[str, torch.Tensor]]:
    """(global Megatron-Core name, full tensor) for every tensor of the model, on the ranks `receivers`
    names (see the module docstring); the other ranks yield nothing but must still iterate.

    A tensor a rank holds whole is yielded as the model's own tensor (not a copy).
    """
    if receivers not in RECEIVERS:
        raise ValueError(f"receivers {receivers!r}: use one of {RECEIVERS}")
    ranks = RankPosition.current()
    held: dict[str, tuple[RankTensor, torch.Tensor]] = {}
    for chunk in chunks:
        for entry, tensor in rank_tensors(chunk, plan, num_experts, ranks):
            held.setdefault(entry.global_name, (entry, tensor.detach()))
    rule_order = {rule: i for i, rule in enumerate(plan.naming.rules)}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        for name in sorted(held, key=lambda n: _catalogue_key(held[n][0].plan, rule_order)):
            yield name, held[name][1]
        return

    me = dist.get_rank()
    mine = []
    for entry, tensor in held.values():
        if not _reports(entry, ranks):
            continue
        group = (me,) if entry.slice.whole else tuple(dist.get_process_group_ranks(_group_of(entry)))
        mine.append(Holding(entry.global_name, tuple(tensor.shape), str(tensor.dtype), entry.slice, group))
    everyone: list[list[Holding]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    source: dict[str, tuple[int, Holding]] = {}
    for rank, holdings in enumerate(everyone):
        for holding in holdings:
            source.setdefault(holding.global_name, (rank, holding))
    plans = {name: plan.tensor(name) for name in source}

    for name in sorted(source, key=lambda n: _catalogue_key(plans[n], rule_order)):
        src, holding = source[name]
        full = None
        if me in holding.group:
            entry, local = held[name]
            if holding.slice.whole:
                full = local
            else:
                parts = [torch.empty_like(local) for _ in holding.group]
                dist.all_gather(parts, local.contiguous(), group=_group_of(entry))
                full = holding.slice.joined(parts)
        if receivers == OWNER:
            if me == src:
                yield name, full
        elif receivers == ALL:
            full = _receive_buffer(holding) if full is None else full.contiguous()
            dist.broadcast(full, src)
            yield name, full
        elif src == 0 and me == 0:
            yield name, full
        elif me == src:
            dist.send(full.contiguous(), 0)
        elif me == 0:
            full = _receive_buffer(holding)
            dist.recv(full, src)
            yield name, full
