"""Context parallelism for DeepSeek-V4: every sequence split into contiguous chunks over the CP ranks.

CP rank r of `cp` holds tokens [r * s / cp, (r + 1) * s / cp) of every sequence. A contiguous split is
balanced for this attention: every query costs about the same (its window plus k indexer picks in CSA
layers, plus t / 128 entries in HCA layers), so the zigzag split Megatron-Core's
`get_batch_on_this_cp_rank` makes for causal dense attention buys nothing here, and the attention's
window and compressed entries rely on the chunk being one run of consecutive tokens.

Everything per token (embedding, hyper-connections, MoE and hash routing, norms, output layer, loss)
runs on the local chunk unchanged; the attention exchanges only small pieces of its key side (see
`megatron_v4.attention`): the rows just before the chunk (`preceding_rows`) and every rank's compressed
entries (`gather_entries`); MTP's shift by one token reads the next rank's first token (`roll_left`).

Losses: Megatron-Core's DDP averages gradients over the data-parallel-with-context group, i.e. divides
by the CP size too, while the ranks' losses add up to the sequence's loss. Each rank therefore scales
its share of a loss by the CP size (Megatron-Core's schedules do so themselves for the two-value loss
functions and for the indexer loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def context_parallel_group(pg_collection=None) -> dist.ProcessGroup:
    return pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()


def local_chunk(tensor: torch.Tensor, dim: int, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """This CP rank's contiguous chunk of `tensor` along `dim` (the sequence dimension)."""
    cp = cp_group.size()
    if cp == 1:
        return tensor
    length = tensor.shape[dim]
    if length % cp:
        raise ValueError(
            f"sequence length {length} is not divisible by the context-parallel size {cp}; "
            f"use a sequence length that is a multiple of {cp}"
        )
    return tensor.chunk(cp, dim=dim)[cp_group.rank()].contiguous()


def gather_chunks(tensor: torch.Tensor, dim: int, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence from the CP ranks' chunks along `dim`, without autograd (ids, positions, logits)."""
    if cp_group.size() == 1:
        return tensor
    chunks = [torch.empty_like(tensor) for _ in range(cp_group.size())]
    dist.all_gather(chunks, tensor.contiguous(), group=cp_group)
    return torch.cat(chunks, dim=dim)


def chunk_start(local_length: int, cp_group: dist.ProcessGroup) -> int:
    """Position of this rank's first token in the sequence."""
    return cp_group.rank() * local_length


def roll_left(
    tensor: torch.Tensor, cp_group: dist.ProcessGroup, boundary_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shift the last dim (the sequence of [batch, seq] ids, labels or masks) one step left: element i
    becomes element i + 1 of the whole sequence; the sequence's last element becomes 0. With
    `boundary_mask` (this chunk's [batch, seq], 0 at the last token of each document of a packed row)
    the shift stays inside documents: each document's last element becomes 0 too.

    Megatron-Core's `roll_tensor` with a CP group expects its zigzag split, so this is the contiguous
    one: the last element of a chunk is the next CP rank's first (an all-gather of first elements)."""
    rolled = tensor.roll(-1, dims=-1)
    rolled[..., -1] = 0
    if cp_group.size() > 1:
        firsts = gather_chunks(tensor[..., :1], -1, cp_group)
        rank = cp_group.rank()
        if rank + 1 < cp_group.size():
            rolled[..., -1] = firsts[..., rank + 1]
    if boundary_mask is not None:
        rolled = rolled * boundary_mask.to(rolled.dtype)
    return rolled


def preceding_rows(tensor: torch.Tensor, rows: int, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """The `rows` rows of the sequence just before this rank's chunk along dim 0 (fewer near the sequence
    start, none on the first rank), with autograd: an all-gather of every rank's last min(rows, chunk)
    rows (a chunk shorter than `rows` lends all of itself, and the rows come from several ranks), whose
    backward reduce-scatters each row's gradient back to the rank that owns it."""
    if cp_group.size() == 1 or rows == 0:
        return tensor[:0]
    tail = min(rows, tensor.shape[0])
    tails = gather_from_sequence_parallel_region(tensor[-tail:], tensor_parallel_output_grad=True, group=cp_group)
    earlier = tails[: cp_group.rank() * tail]
    return earlier[max(earlier.shape[0] - rows, 0) :]


def gather_entries(local: torch.Tensor, counts: list[int], cp_group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's rows along dim 0 in rank order, with autograd: local [counts[rank], ...] ->
    [sum(counts), ...]. The ranks' rows are padded to the longest for the all-gather; its backward
    reduce-scatters, so each rank's rows collect the gradient every rank sends them."""
    if cp_group.size() == 1:
        return local
    longest = max(counts)
    padded = torch.cat((local, local.new_zeros(longest - local.shape[0], *local.shape[1:])))
    gathered = gather_from_sequence_parallel_region(padded, tensor_parallel_output_grad=True, group=cp_group)
    return torch.cat([gathered[rank * longest : rank * longest + count] for rank, count in enumerate(counts)])


class KeepInBackward(torch.autograd.Function):
    """Identity on `tensor` that puts `others` into its graph (their gradient from here is zero).

    A rank whose own queries read none of a gathered tensor (a first chunk before the first HCA entry)
    would otherwise skip that gather's backward reduce-scatter, which the other ranks wait in."""

    @staticmethod
    def forward(ctx, tensor, *others):
        ctx.shapes = [(other.shape, other.dtype, other.device) for other in others]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))
