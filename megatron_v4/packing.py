"""Packed sequences: several documents in one row, as Megatron-Core's THD format describes them.

A packed row of T tokens holds documents back to back; their boundaries are the cumulative
lengths cu_seqlens = [0, n_0, n_0 + n_1, ..., T] (`PackedSeqParams.cu_seqlens_q`, with
`qkv_format="thd"` and batch 1). Every document computes exactly what it computes alone:

- positions (RoPE, compressed-entry visibility) restart at 0 at each document start;
- the attention (window, compressors, CSA overlap, indexer candidates) reads only its own
  document (`megatron_v4.attention`);
- the last token of a document has no next token to predict: its label belongs to the next
  document, so `document_loss_mask` zeroes it, and MTP's shifts stop at the boundary
  (`megatron_v4.context_parallel.roll_left` with that mask).

Under context parallelism the row is split contiguously over the CP ranks (documents may straddle
chunk boundaries) and `cu_seqlens` still describe the whole row.

No token is padded: the attention loops over the documents of the row.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def packed_seq_params(cu_seqlens: torch.Tensor | list[int]) -> PackedSeqParams:
    """Megatron-Core's THD parameters for one packed row with document boundaries `cu_seqlens`."""
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def document_spans(params: PackedSeqParams, length: int) -> list[tuple[int, int]]:
    """[(start, end)] of the non-empty documents of a packed row of `length` tokens, checked."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format={params.qkv_format!r}; packed rows use 'thd'")
    bounds = params.cu_seqlens_q.tolist()
    if params.cu_seqlens_kv is not None and params.cu_seqlens_kv.tolist() != bounds:
        raise ValueError("cu_seqlens_kv differs from cu_seqlens_q; self-attention needs the same boundaries")
    if params.cu_seqlens_q_padded is not None and params.cu_seqlens_q_padded.tolist() != bounds:
        raise ValueError("padded cu_seqlens are not supported; packed rows here are padding-free")
    if (
        not bounds
        or bounds[0] != 0
        or bounds[-1] != length
        or any(later < earlier for earlier, later in pairwise(bounds))
    ):
        raise ValueError(
            f"cu_seqlens {bounds} must rise from 0 to the row length {length}; "
            "pass the cumulative document lengths of the row"
        )
    return [(start, end) for start, end in pairwise(bounds) if end > start]


def document_positions(cu_seqlens: torch.Tensor | list[int]) -> torch.Tensor:
    """Positions [T] that restart at 0 at every document start."""
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


def document_loss_mask(cu_seqlens: torch.Tensor | list[int]) -> torch.Tensor:
    """float32 [T]: 1, except 0 at the last token of every document (its label is the next document's)."""
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long)
    mask = torch.ones(int(cu_seqlens[-1]), dtype=torch.float32, device=cu_seqlens.device)
    ends = cu_seqlens[1:][cu_seqlens[1:] > cu_seqlens[:-1]]
    mask[ends - 1] = 0.0
    return mask
