"""DeepSeek-V4 hybrid attention (DeepSeek-V4 report; official inference/model.py) as a Megatron-Core module.

One class serves the three layer types; `compress_ratios[layer_number - 1]`
picks the type:

- ratio 0, sliding window: each query t reads the keys at t-window+1 .. t;
- ratio 4, CSA: the window plus the lightning indexer's top-k compressed entries
  (with `csa_dense_attention`: every visible entry, as HCA);
- ratio 128, HCA: the window plus every visible compressed entry.

All types share: low-rank query (linear_q_down_proj -> q_layernorm ->
linear_q_up_proj) with a weightless RMS norm per head; a single KV head
(linear_kv -> kv_layernorm) read as both key and value; RoPE on the last
qk_rope_head_dim channels; a learned per-head sink logit that joins the softmax
denominator only; the inverse RoPE on the output; and a grouped output
projection (linear_o_down_proj per head group, then linear_proj).

Cost per query token (H heads of width c, window W, k = index_topk, n = number
of visible compressed entries, n_I/c_I indexer heads/width). No [seq, seq]
score matrix is ever built: queries are processed in blocks of W, each block
reading the 2W-1 keys its window can reach.

Memory: the softmax runs over chunks of ATTENTION_CHUNK queries, each under
activation checkpointing (`torch.utils.checkpoint`, non-reentrant). The scores,
probabilities and gathered entries of a chunk exist only while it is computed,
and the backward recomputes them chunk by chunk, so a layer keeps for the
backward only per-token vectors (O(s*(H*c + D)), no O(s*k*c) gather, no O(s*H*(W+k))
probabilities) and the transient peak is one chunk's ~C*(k*c + H*(2W + k)) floats.
The price is one more evaluation of the scores and outputs in the backward.

- sliding: scores/probabilities H*(2W-1); ~4*H*c*(2W-1) FLOPs (QK and PV, about
  twice the minimal 4*H*c*W because a block reads the union of its windows);
  key/value memory: the blocked copy of the single KV head, ~2*c per token.
- CSA: sliding + indexer + k entries. Indexer: ~2*n_I*c_I*n FLOPs, transient
  n_I*n scores (128 queries at a time, no autograd); attention: the k picked
  entries are gathered per query (k*c memory, one chunk at a time), H*k scores,
  ~4*H*c*k FLOPs. n ~ t/4 for query t.
- HCA: sliding + all n ~ t/128 entries (shared by all queries, no gather):
  H*n scores, ~4*H*c*n FLOPs.
- compressors: ~2*coff*c*D FLOPs per token (coff = 2 for CSA, 1 for HCA) twice (kv, gate).

Indexer training (`indexer_loss_coeff` > 0, see `megatron_v4.indexer_loss`): a CSA
layer's training forward also computes the indexer's distillation loss against this
layer's own entry probabilities (the float32 softmax, detached, head-summed and
all-reduced over the tensor-parallel ranks: O(s * entries) more memory) and attaches
it to the output. The dense loss goes with dense attention, the sparse loss with
top-k attention, so the teacher is always exactly what the layer attends.

Tensor parallelism: query heads, sinks, output groups and indexer heads are split
over the tensor-parallel ranks; the KV head, compressors and q_down are
replicated. Replicated tensors that feed per-rank heads pass through
`copy_to_tensor_model_parallel_region`, so their gradients (and the input's) are
summed over the ranks: every replicated parameter ends the backward with its full
gradient on every rank.

Sequence parallelism: the sliding window, the compressors and the indexer need
every earlier token, so the attention gathers the sequence at its entry and runs
exactly as without sequence parallelism (its sublayers are built with
`sequence_parallel=False`, which also leaves their norms out of Megatron's
sequence-parallel gradient all-reduce); the gather's backward keeps this rank's
slice of the (already complete) input gradient. `linear_proj` is the row-parallel
exit: it reduce-scatters the output back to this rank's slice of the sequence.
Context parallelism (`megatron_v4.context_parallel`): each CP rank holds a contiguous
chunk of the sequence and computes the queries and window keys of its own tokens, plus the
key side of what straddles the chunk's start: the halo, the `window - 1` tokens before the
chunk (the window's reach) or the span - 1 = 2m - 1 (CSA) / m - 1 (HCA) an entry ending in the
chunk pools, whichever is more (`preceding_rows`: an all-gather of each rank's last rows, whose
backward reduce-scatters the halo's gradient back to its owner). Each rank compresses the entries
(and indexer keys) whose window ends in its chunk, then all ranks' entries are all-gathered
(`gather_entries`, backward reduce-scatter), so every query sees the entries of all earlier chunks.
Per rank the queries, scores, window keys and compressors are 1/cp of the work; what is exchanged
per layer is the halo (at most max(W - 1, span - 1) rows of D; the all-gather briefly holds every
rank's last rows, cp times that) and the s/m entries of width c (+ c_I): no rank holds O(s) rows
of the input.

Packed sequences (`packed_seq_params`, Megatron-Core's THD format, batch 1; see
`megatron_v4.packing`): the projections run over the whole row at positions that restart at
every document start; the compressors, the indexer (and its loss) and the softmax then run
document by document, so windows, compressed entries and the indexer's candidates never reach
into another document and no token pays for another document's length. Under context
parallelism too: cu_seqlens describe the whole row; each rank compresses, document by document,
the entries whose window ends in its chunk (counted from the document's start), the gathered
entries of the row are in document order, and a document's queries read its window keys from the
chunk and the halo (never before the document's start) and its own entries complete so far.

Decoding: with an `inference_context` (`megatron_v4.inference.DeepSeekV4InferenceContext`)
the first forward of a sequence is the ordinary computation above and also keeps the
layer's decode state (window ring, compressed entries, unfinished compressor windows,
indexer keys); later forwards run only the new tokens against that state, one token at
a time: per token ~4*H*c*(W + k) FLOPs for CSA (plus the indexer's ~2*n_I*c_I*n over
the n entries so far), ~4*H*c*(W + n) for HCA, ~4*H*c*W for sliding layers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch.utils.checkpoint import checkpoint

from megatron_v4.compressor import build_replicated_linear
from megatron_v4.config import CSA, SLIDING, DeepSeekV4TransformerConfig
from megatron_v4.context_parallel import (
    KeepInBackward,
    context_parallel_group,
    gather_entries,
    preceding_rows,
)
from megatron_v4.decode_state import AttentionDecodeState
from megatron_v4.indexer_loss import IndexerLossAutoScaler, IndexerLossTracker
from megatron_v4.packing import document_positions, document_spans
from megatron_v4.rope import DeepSeekV4RotaryEmbedding, apply_rotary

# Queries attended at once (see `_attend`): bounds the transient scores, probabilities and gathered
# entries to this many queries' worth, and is the unit the backward recomputes.
ATTENTION_CHUNK = 256


@dataclass
class DeepSeekV4HybridSelfAttentionSubmodules:
    """Building blocks of the hybrid attention; see `megatron_v4.specs.get_dsv4_attention_spec`."""

    linear_q_down_proj: ModuleSpec | type = None
    q_layernorm: ModuleSpec | type = None
    linear_q_up_proj: ModuleSpec | type = None
    linear_kv: ModuleSpec | type = None
    kv_layernorm: ModuleSpec | type = None
    linear_o_down_proj: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None
    compressor: ModuleSpec | type = None
    indexer: ModuleSpec | type = None


class GroupedColumnParallelLinear(ColumnParallelLinear):
    """Block-diagonal linear: one [R, in] matrix per head group (the checkpoint's wo_a).

    The weight is stored stacked, [num_groups * R, in], so that the column-parallel split
    of its first dim hands each tensor-parallel rank whole groups: exactly the groups of
    the heads that rank owns. forward(x [..., local groups, in]) -> ([..., local groups * R], None).
    """

    def __init__(self, input_size: int, output_size: int, *, num_groups: int, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        tp_size = self.tp_group.size()
        if num_groups % tp_size:
            raise ValueError(
                f"o_groups={num_groups} is not divisible by the tensor-parallel size {tp_size}; "
                f"choose a tensor-parallel size that divides o_groups"
            )
        self.local_groups = num_groups // tp_size

    def forward(self, x: torch.Tensor):
        group_weights = self.weight.view(self.local_groups, -1, self.input_size)
        return torch.einsum("...gi,gri->...gr", x, group_weights).flatten(-2), None


def per_head_rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The weightless RMS norm V4 applies to every query head."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class DeepSeekV4HybridSelfAttention(MegatronModule):
    """Sliding-window / CSA / HCA self-attention of DeepSeek-V4.

    forward(hidden_states [s, b, D], attention_mask=None, position_ids=None, **kwargs)
    -> (output [s, b, D], None).

    The layer builds its own causal masks (sliding window + compressed-entry
    visibility), so `attention_mask` is not read: sequences are causal and unpadded.
    `position_ids` ([b, s], default 0..s-1) set the RoPE phases and the entry
    visibility; compressed entries always sit at positions w * compress_ratio, i.e. the
    sequence is assumed to start at position 0 (training and prefill).
    `compress_ratio` overrides the config's per-layer ratio (MTP layers pass 0).
    `inference_context` switches on incremental decoding (see the module docstring).
    """

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        submodules: DeepSeekV4HybridSelfAttentionSubmodules,
        layer_number: int,
        compress_ratio: int | None = None,
        pg_collection=None,
        name: str | None = None,
        **unused_kwargs,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.compress_ratio = self._resolve_compress_ratio(config, layer_number, compress_ratio)
        self.tp_group = (
            pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        )
        self.cp_group = context_parallel_group(pg_collection)
        tp_size = self.tp_group.size()
        if config.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not divisible by the "
                f"tensor-parallel size {tp_size}; choose a tensor-parallel size that divides it"
            )
        self.head_dim = config.kv_channels
        self.local_heads = config.num_attention_heads // tp_size
        self.window = config.sliding_window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Everything before linear_proj runs on the gathered sequence (see the module docstring).
        full_sequence_config = copy.copy(config)
        full_sequence_config.sequence_parallel = False

        column_parallel_kwargs = dict(
            config=full_sequence_config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_group=self.tp_group,
        )
        self.linear_q_down_proj = build_replicated_linear(
            submodules.linear_q_down_proj,
            full_sequence_config,
            config.hidden_size,
            config.q_lora_rank,
            "q_down_proj",
        )
        self.q_layernorm = build_module(
            submodules.q_layernorm,
            config=full_sequence_config,
            hidden_size=config.q_lora_rank,
            eps=config.layernorm_epsilon,
        )
        self.linear_q_up_proj = build_module(
            submodules.linear_q_up_proj,
            config.q_lora_rank,
            config.num_attention_heads * self.head_dim,
            tp_comm_buffer_name="q_up_proj",
            **column_parallel_kwargs,
        )
        self.linear_kv = build_replicated_linear(
            submodules.linear_kv, full_sequence_config, config.hidden_size, self.head_dim, "kv"
        )
        self.kv_layernorm = build_module(
            submodules.kv_layernorm,
            config=full_sequence_config,
            hidden_size=self.head_dim,
            eps=config.layernorm_epsilon,
        )
        # Zeros: the sink starts as one extra logit of 0 (transformers initialises it so too).
        self.attn_sink = torch.nn.Parameter(torch.zeros(self.local_heads, dtype=torch.float32))
        set_tensor_model_parallel_attributes(self.attn_sink, is_parallel=True, dim=0, stride=1)
        self.linear_o_down_proj = build_module(
            submodules.linear_o_down_proj,
            config.num_attention_heads * self.head_dim // config.o_groups,
            config.o_groups * config.o_lora_rank,
            num_groups=config.o_groups,
            tp_comm_buffer_name="o_down_proj",
            **column_parallel_kwargs,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.o_groups * config.o_lora_rank,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )
        self.compressor = None
        self.indexer = None
        if self.compress_ratio != SLIDING:
            self.compressor = build_module(
                submodules.compressor,
                config=full_sequence_config,
                compress_ratio=self.compress_ratio,
                head_dim=self.head_dim,
            )
        if self.compress_ratio == CSA:
            self.indexer = build_module(
                submodules.indexer, config=full_sequence_config, tp_group=self.tp_group
            )
        # Context parallelism: the tokens before its chunk a rank reads, for the window's keys and for
        # the entries whose pooled tokens straddle the chunk's start.
        self.halo = max(self.window - 1, 0 if self.compressor is None else self.compressor.span - 1)
        # CSA layers attend to the indexer's picks, unless in the dense phase.
        self.topk_attention = self.indexer is not None and not config.csa_dense_attention
        self.rotary = DeepSeekV4RotaryEmbedding(config, compressed=self.compress_ratio != SLIDING)

    @staticmethod
    def _resolve_compress_ratio(config, layer_number: int, compress_ratio: int | None) -> int:
        if compress_ratio is not None:
            return compress_ratio
        if not 1 <= layer_number <= len(config.compress_ratios):
            raise ValueError(
                f"layer_number={layer_number} has no entry in compress_ratios (length "
                f"{len(config.compress_ratios)}); pass compress_ratio explicitly (0 for MTP layers)"
            )
        return config.compress_ratios[layer_number - 1]

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        inference_context=None,
        packed_seq_params=None,
        **kwargs,
    ):
        """With `inference_context` (a `DeepSeekV4InferenceContext`): the first forward of a sequence
        (from position 0) fills this layer's decode state, later ones extend it token by token.
        With `packed_seq_params` (THD, batch 1; see `megatron_v4.packing`): every document of the row
        is attended on its own, at positions derived from the boundaries (`position_ids` unread)."""
        if kwargs.get("inference_params") is not None:
            raise NotImplementedError("DeepSeekV4HybridSelfAttention does not support inference_params; pass None")
        if inference_context is not None and packed_seq_params is not None:
            raise NotImplementedError("decoding does not take packed sequences; decode one sequence per row")
        if inference_context is not None and self.config.sequence_parallel:
            raise NotImplementedError(
                "decoding with an inference_context needs sequence_parallel=False (one new token "
                "cannot be split over the tensor-parallel ranks); build the model without it"
            )
        if inference_context is not None and self.cp_group.size() > 1:
            raise NotImplementedError(
                "decoding with an inference_context needs context_parallel_size=1 (the decode state "
                "holds the whole sequence); prefill and decode without context parallelism"
            )
        if inference_context is not None and inference_context.attention_state(self) is not None:
            return self._decode(hidden_states, position_ids, inference_context.attention_state(self))
        if self.config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group
            )
        seq_len, batch, _ = hidden_states.shape
        # Under context parallelism this rank's queries are rows [chunk_start, chunk_start + seq_len) of the
        # row; packed_seq_params always describe the whole row.
        cp = self.cp_group.size()
        chunk_start = self.cp_group.rank() * seq_len
        if packed_seq_params is None:
            documents = [(0, seq_len * cp)]
            positions = self._positions(position_ids, seq_len, batch, hidden_states.device)
        elif batch != 1:
            raise ValueError(f"a packed row is one sequence (batch 1), got batch {batch}; pack the batch into one row")
        else:
            documents = document_spans(packed_seq_params, seq_len * cp)
            row_positions = document_positions(packed_seq_params.cu_seqlens_q.to(hidden_states.device))
            positions = row_positions[chunk_start : chunk_start + seq_len].unsqueeze(1)
        cos, sin = self.rotary(positions)  # [s, b, r/2]
        head_cos, head_sin = cos.unsqueeze(2), sin.unsqueeze(2)

        q_compressed = self.q_layernorm(self.linear_q_down_proj(hidden_states)[0])
        query = self.linear_q_up_proj(q_compressed)[0].view(seq_len, batch, self.local_heads, self.head_dim)
        query = apply_rotary(per_head_rms_normalize(query, self.config.layernorm_epsilon), head_cos, head_sin)

        # Only while autograd records: not in evaluation, nor in the no-grad first pass of a recomputed layer.
        indexer_loss_on = (
            self.indexer is not None
            and self.config.indexer_loss_coeff > 0
            and self.training
            and torch.is_grad_enabled()
        )
        # The key side: this chunk and, under context parallelism, the `halo` tokens before it (never
        # concatenated with the chunk: each is projected on its own).
        halo_states = preceding_rows(hidden_states, self.halo, self.cp_group)
        # Window keys for the chunk and the window - 1 rows before it.
        window_start = max(chunk_start - (self.window - 1), 0)
        window_halo = halo_states[halo_states.shape[0] - (chunk_start - window_start) :]
        window_positions = torch.cat((preceding_rows(positions, self.window - 1, self.cp_group), positions))
        window_cos, window_sin = self.rotary(window_positions)
        key_value = torch.cat((self.linear_kv(window_halo)[0], self.linear_kv(hidden_states)[0]))
        key_value = apply_rotary(self.kv_layernorm(key_value), window_cos, window_sin)
        key_value = copy_to_tensor_model_parallel_region(key_value, group=self.tp_group)
        entries, index_keys = self._compressed_entries(hidden_states, halo_states, documents, chunk_start, indexer_loss_on)

        outputs, indexer_kl = [], []
        entry_offset = 0  # the document's first entry in `entries` (all documents' entries, in row order)
        for document_start, document_end in documents:
            # The document's queries on this rank, and its entries complete before the last of them.
            query_start, query_end = max(document_start, chunk_start), min(document_end, chunk_start + seq_len)
            document_entries = document_keys = None
            if entries is not None:
                visible = slice(entry_offset, entry_offset + max(query_end - document_start, 0) // self.compress_ratio)
                entry_offset += (document_end - document_start) // self.compress_ratio
                document_entries = entries[visible]
                document_keys = None if index_keys is None else index_keys[visible]
            if query_start >= query_end:
                continue
            rows = slice(query_start - chunk_start, query_end - chunk_start)
            output, kl = self._attend_document(
                hidden_states[rows],
                q_compressed[rows],
                query[rows],
                key_value[max(document_start, window_start) - window_start : query_end - window_start],
                document_entries,
                document_keys,
                positions[rows],
                indexer_loss_on,
                inference_context,
            )
            outputs.append(output)
            if kl is not None:
                indexer_kl.append(kl)
        output = torch.cat(outputs)
        if cp > 1:
            # Every rank takes part in the backward of both exchanges, in the same order: the entries'
            # all-gather (tied to the output here) before the halo's (tied to the entries it feeds).
            exchanged = entries if entries is not None and entries.requires_grad else halo_states
            output = KeepInBackward.apply(output, exchanged)
        output, bias = self._project_output(output, head_cos, head_sin)
        if indexer_kl:
            # Per token of the whole row (gathered under sequence parallelism): every tensor-parallel
            # rank holds the same loss and back-propagates it into its own indexer heads. Under context
            # parallelism this rank's queries are one chunk of the row: its share of the loss.
            loss = sum(indexer_kl) * (self.config.indexer_loss_coeff / (seq_len * cp * batch))
            IndexerLossTracker.record(self.layer_number, loss)
            output = IndexerLossAutoScaler.apply(output, loss)
        return output, bias

    def _compressed_entries(self, hidden_states, halo_states, documents, chunk_start: int, indexer_loss_on: bool):
        """The compressed entries and indexer keys of every document of the row, concatenated in row
        order ([entries, b, c] and [entries, b, c_I]; None where the layer has none), from this rank's
        chunk hidden_states and the halo_states just before it.

        Each rank compresses the entries whose window ends in its chunk (an entry straddling the chunk's
        start reads the halo), then all ranks' entries are all-gathered: s / m rows per layer, where
        the window keys and queries stay on their chunk."""
        if self.compressor is None:
            return None, None
        chunk_length, batch, _ = hidden_states.shape
        halo_start = chunk_start - halo_states.shape[0]
        with_index_keys = self.topk_attention or indexer_loss_on
        entries, index_keys = [], []
        for document_start, document_end in documents:
            first, end = self._entry_range(document_start, document_end, chunk_start, chunk_start + chunk_length)
            if end <= first:
                continue
            # An entry pools the `span` tokens ending at its window's last token.
            input_start = max(document_start + (first + 1) * self.compress_ratio - self.compressor.span, document_start)
            input_end = document_start + end * self.compress_ratio
            blocks = [
                halo_states[input_start - halo_start : max(chunk_start, input_start) - halo_start],
                hidden_states[max(input_start - chunk_start, 0) : input_end - chunk_start],
            ]
            entries.append(self.compressor(blocks, first))
            if with_index_keys:
                # Detached: the indexer's keys get gradient from the indexer loss alone.
                index_keys.append(self.indexer.compressor([block.detach() for block in blocks], first))
        entries = torch.cat(entries) if entries else hidden_states.new_zeros(0, batch, self.head_dim)
        if with_index_keys:
            index_width = self.indexer.compressor.head_dim
            index_keys = torch.cat(index_keys) if index_keys else hidden_states.new_zeros(0, batch, index_width)
            if not indexer_loss_on:
                index_keys = index_keys.detach()
        else:
            index_keys = None
        counts = self._entries_per_rank(documents, chunk_length)
        if self.cp_group.size() > 1 and max(counts) > 0:
            # One all-gather for both: their backward reduce-scatters then run in the same order on every rank.
            exchanged = entries if index_keys is None else torch.cat((entries, index_keys), dim=-1)
            exchanged = gather_entries(KeepInBackward.apply(exchanged, halo_states), counts, self.cp_group)
            if index_keys is None:
                entries = exchanged
            else:
                entries, index_keys = exchanged.split((self.head_dim, index_width), dim=-1)
        return copy_to_tensor_model_parallel_region(entries, group=self.tp_group), index_keys

    def _entries_per_rank(self, documents, chunk_length: int) -> list[int]:
        """How many entries each CP rank compresses (the same list on every rank)."""
        counts = []
        for rank in range(self.cp_group.size()):
            chunk = (rank * chunk_length, (rank + 1) * chunk_length)
            counts.append(sum(max(end - first, 0) for first, end in (self._entry_range(*d, *chunk) for d in documents)))
        return counts

    def _entry_range(self, document_start: int, document_end: int, chunk_start: int, chunk_end: int):
        """Ids [first, end) of the document's entries whose window ends in the chunk [chunk_start, chunk_end)
        (entry w ends at the document's token (w + 1) * m - 1; count of entries ending before p: (p - start) // m)."""
        first = max(chunk_start - document_start, 0) // self.compress_ratio
        end = max(min(document_end, chunk_end) - document_start, 0) // self.compress_ratio
        return first, end

    def _attend_document(
        self,
        hidden_states,
        q_compressed,
        query,
        key_value,
        entries,
        index_keys,
        positions,
        indexer_loss_on,
        context,
    ):
        """Indexer and attention of one document (of a packed row, or the whole row) for its queries on
        this rank, whose projections are done: hidden_states, q_compressed, query and positions are the
        queries' rows, the last rows of key_value (window keys); entries and index_keys are the document's
        entries complete before its last query here. Returns the attention output [s, b, H_local, c] and
        the indexer's summed KL (None when the indexer loss is off or there are no entries)."""
        picks = None
        if self.topk_attention:
            picks = self.indexer(hidden_states, q_compressed, positions, index_keys)
        if context is not None:
            # Decoding runs without context parallelism: the queries' rows are the whole document.
            self._start_decode(context, hidden_states, positions, key_value, entries, index_keys)

        output, teacher_mass = self._attend(query, key_value, entries, picks, positions, indexer_loss_on)
        if teacher_mass is None:
            return output, None
        if self.tp_group.size() > 1:
            dist.all_reduce(teacher_mass, group=self.tp_group)
        kl = self.indexer.distillation_loss(hidden_states, q_compressed, positions, index_keys, teacher_mass, picks)
        return output, kl

    def _project_output(self, output, head_cos, head_sin):
        """Inverse RoPE, then the grouped output projection; [s, b, H_local, c] -> (out [s, b, D], bias)."""
        seq_len, batch = output.shape[:2]
        output = apply_rotary(output, head_cos, head_sin, inverse=True)
        output = self.linear_o_down_proj(output.reshape(seq_len, batch, self.linear_o_down_proj.local_groups, -1))[0]
        return self.linear_proj(output)

    def _start_decode(self, context, hidden_states, positions, key_value, entries, index_keys) -> None:
        """Prefill: keep what later tokens need (the layer's caches in the official inference code)."""
        seq_len, batch, _ = hidden_states.shape
        if positions[0, 0].item() != 0:
            raise ValueError(
                "the first forward of a sequence with an inference_context must start at position 0; "
                "reset() the context or pass position_ids from 0"
            )
        max_length = context.max_sequence_length
        state = AttentionDecodeState(
            window_kv=key_value.new_zeros(self.window, batch, self.head_dim),
            compressor=None if self.compressor is None else self.compressor.start_decode(
                hidden_states, entries, max_length
            ),
            indexer_compressor=None if not self.topk_attention else self.indexer.compressor.start_decode(
                hidden_states, index_keys, max_length
            ),
            length=seq_len,
        )
        first_kept = max(seq_len - self.window, 0)
        state.push_kv(key_value[first_kept:].detach(), first_kept)
        context.set_attention_state(self, state)

    @torch.no_grad()
    def _decode(self, hidden_states, position_ids, state: AttentionDecodeState):
        """The next tokens [s, b, D] of sequences whose earlier tokens are in `state`.

        The projections run on all s tokens at once; the stateful part (window ring, compressors,
        indexer, softmax) goes token by token, each token seeing the state its predecessors left.
        """
        seq_len, batch, _ = hidden_states.shape
        positions = self._positions(position_ids, seq_len, batch, hidden_states.device)
        if positions[0, 0].item() != state.length:
            raise ValueError(
                f"decode position {positions[0, 0].item()} does not follow the {state.length} tokens "
                "in the decode state; pass the inference_context's sequence_len_offset as the position"
            )
        cos, sin = self.rotary(positions)
        head_cos, head_sin = cos.unsqueeze(2), sin.unsqueeze(2)
        q_compressed = self.q_layernorm(self.linear_q_down_proj(hidden_states)[0])
        query = self.linear_q_up_proj(q_compressed)[0].view(seq_len, batch, self.local_heads, self.head_dim)
        query = apply_rotary(per_head_rms_normalize(query, self.config.layernorm_epsilon), head_cos, head_sin)
        key_value = apply_rotary(self.kv_layernorm(self.linear_kv(hidden_states)[0]), cos, sin)

        outputs = []
        for i in range(seq_len):
            position = state.length
            state.push_kv(key_value[i : i + 1], position)
            state.length += 1
            keys = [state.window_keys]
            if self.compressor is not None:
                self.compressor.decode_step(hidden_states[i], position, state.compressor)
                entries = state.compressor.emitted
                if self.topk_attention:
                    picks = self.indexer.decode_step(
                        hidden_states[i], q_compressed[i], position, state.indexer_compressor
                    )
                    batch_ids = torch.arange(batch, device=picks.device).unsqueeze(1)
                    entries = entries.transpose(0, 1)[batch_ids, picks].transpose(0, 1)
                keys.append(entries)
            outputs.append(self._attend_cached(query[i], torch.cat(keys, dim=0)))
        return self._project_output(torch.stack(outputs), head_cos, head_sin)

    def _attend_cached(self, query, keys):
        """query [b, H_local, c] against keys [n, b, c] (window + compressed entries) plus the sink."""
        scores = torch.einsum("bhc,nbc->bhn", query, keys).float() * self.scale
        sink = self.attn_sink.view(1, -1, 1).expand(*scores.shape[:2], 1)
        probabilities = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1].to(query.dtype)
        return torch.einsum("bhn,nbc->bhc", probabilities, keys)

    @staticmethod
    def _positions(position_ids, seq_len: int, batch: int, device) -> torch.Tensor:
        """Token positions as [s, b] (Megatron-Core passes position_ids as [b, s])."""
        if position_ids is None:
            return torch.arange(seq_len, device=device).unsqueeze(1).expand(seq_len, batch)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        return position_ids.transpose(0, 1).expand(seq_len, batch)

    def _attend(self, query, key_value, entries, picks, positions, with_teacher: bool):
        """Softmax over window keys + compressed entries + sink, for queries [s_q, b, H_local, c]
        that are the last s_q rows of key_value [s_k, b, c] (s_q = s_k in an ordinary forward).

        entries: [n, b, c] or None; picks: [s_q, b, k] or None (attend every visible entry);
        positions: the queries' [s_q, b]. Returns the output [s_q, b, H_local, c] and, with
        `with_teacher`, the indexer's teacher: the entries' float32 probabilities summed over this
        rank's heads, detached ([s_q, b, n or k]; None without entries).

        Queries go in chunks of ATTENTION_CHUNK, each under activation checkpointing: the backward
        recomputes a chunk's scores and re-gathers its picked entries instead of keeping them, so
        what a layer keeps for the backward is linear in s (no [s, b, k, c] gather, no [s, b, H, keys]
        probabilities) and the transient memory is one chunk's.
        """
        query_len, key_len = query.shape[0], key_value.shape[0]
        first_row = key_len - query_len
        if entries is not None and entries.shape[0] == 0:
            entries = None
        # window - 1 zero rows in front: the (masked) left context of key row 0.
        padded_keys = F.pad(key_value, (0, 0, 0, 0, self.window - 1, 0))
        outputs, teachers = [], []
        for start in range(0, query_len, ATTENTION_CHUNK):
            end = min(start + ATTENTION_CHUNK, query_len)
            # Key rows first_row + start - window + 1 .. first_row + end - 1 (padded: + window - 1).
            chunk_keys = padded_keys[first_row + start : first_row + end + self.window - 1]
            chunk_picks = None if picks is None else picks[start:end]
            arguments = (query[start:end], chunk_keys, first_row + start, entries, chunk_picks, positions[start:end])
            if torch.is_grad_enabled():
                output, teacher = checkpoint(self._attend_chunk, *arguments, with_teacher, use_reentrant=False)
            else:
                output, teacher = self._attend_chunk(*arguments, with_teacher)
            outputs.append(output)
            teachers.append(teacher)
        teacher = torch.cat(teachers) if with_teacher and entries is not None else None
        return torch.cat(outputs), teacher

    def _attend_chunk(self, query, window_keys, first_row: int, entries, picks, positions, with_teacher: bool):
        """One chunk of `_attend`: queries [C, b, H, c] at key rows first_row .. first_row + C - 1;
        window_keys [C + W - 1, b, c]: key rows first_row - W + 1 .. first_row + C - 1 (rows below 0
        are padding)."""
        window_scores, window_visible, blocked_keys = self._window_scores(query, window_keys, first_row)
        logits = [window_scores.masked_fill(~window_visible, float("-inf"))]
        if entries is not None:
            entry_keys, entry_scores, entry_visible = self._entry_scores(query, entries, picks, positions)
            logits.append(entry_scores.masked_fill(~entry_visible, float("-inf")))
        sink = self.attn_sink.view(1, 1, -1, 1).expand(*query.shape[:3], 1)
        probabilities = torch.cat(logits + [sink], dim=-1).softmax(dim=-1)[..., :-1]
        window_width = window_scores.shape[-1]
        teacher = None
        if with_teacher and entries is not None:
            teacher = probabilities[..., window_width:].detach().sum(dim=2)
        probabilities = probabilities.to(query.dtype)

        output = self._window_output(probabilities[..., :window_width], blocked_keys, query.shape[0])
        if entries is not None:
            entry_probabilities = probabilities[..., window_width:]
            if picks is None:  # HCA (and dense CSA): every query reads the same entries
                output = output + torch.einsum("sbhn,nbc->sbhc", entry_probabilities, entry_keys)
            else:  # CSA: per-query gathered entries
                output = output + torch.einsum("sbhk,sbkc->sbhc", entry_probabilities, entry_keys)
        return output, teacher

    def _window_block(self, query_len: int) -> int:
        return min(self.window, query_len)

    def _window_scores(self, query, window_keys, first_row: int):
        """Scores of each query against the keys of its block of B = min(W, C) queries.

        Block i holds queries iB .. iB+B-1; they can reach window_keys rows iB .. iB+B+W-2,
        B+W-1 of them. Returns scores [C, b, H, B+W-1] (float32), the visibility mask
        [C, 1, 1, B+W-1] and the blocked keys [blocks, b, c, B+W-1].
        """
        query_len = query.shape[0]
        window, block = self.window, self._window_block(query_len)
        num_blocks = -(-query_len // block)
        padded_len = num_blocks * block
        span = block + window - 1
        padded_query = F.pad(query, (0, 0, 0, 0, 0, 0, 0, padded_len - query_len))
        padded_keys = F.pad(window_keys, (0, 0, 0, 0, 0, padded_len + window - 1 - window_keys.shape[0]))
        blocked_keys = padded_keys.unfold(0, span, block)  # [blocks, b, c, span]
        blocked_query = padded_query.view(num_blocks, block, *query.shape[1:])
        scores = torch.einsum("nqbhc,nbcl->nqbhl", blocked_query, blocked_keys).float() * self.scale

        device = query.device
        # Key rows relative to the chunk's first query; the window reaches back window - 1 rows.
        query_row = torch.arange(padded_len, device=device).view(num_blocks, block, 1)
        key_row = (
            torch.arange(num_blocks, device=device).view(num_blocks, 1, 1) * block
            - (window - 1)
            + torch.arange(span, device=device).view(1, 1, span)
        )
        distance = query_row - key_row
        visible = (distance >= 0) & (distance < window) & (key_row + first_row >= 0)
        scores = scores.flatten(0, 1)[:query_len]
        visible = visible.flatten(0, 1)[:query_len].view(query_len, 1, 1, span)
        return scores, visible, blocked_keys

    def _window_output(self, probabilities, blocked_keys, query_len: int) -> torch.Tensor:
        num_blocks = blocked_keys.shape[0]
        block = self._window_block(query_len)
        padded = F.pad(probabilities, (0, 0, 0, 0, 0, 0, 0, num_blocks * block - query_len))
        blocked = padded.view(num_blocks, block, *probabilities.shape[1:])
        return torch.einsum("nqbhl,nbcl->nqbhc", blocked, blocked_keys).flatten(0, 1)[:query_len]

    def _entry_scores(self, query, entries, picks, positions):
        """Scores against compressed entries: all visible ones (HCA, dense CSA) or the indexer's picks (CSA)."""
        if picks is None:
            visible_count = (positions + 1) // self.compress_ratio  # [s, b]
            entry_ids = torch.arange(entries.shape[0], device=query.device)
            visible = (entry_ids < visible_count.unsqueeze(-1)).unsqueeze(2)  # [s, b, 1, n]
            scores = torch.einsum("sbhc,nbc->sbhn", query, entries).float() * self.scale
            return entries, scores, visible
        batch_ids = torch.arange(query.shape[1], device=query.device).view(1, -1, 1)
        picked = entries.transpose(0, 1)[batch_ids, picks.clamp(min=0)]  # [s, b, k, c]
        scores = torch.einsum("sbhc,sbkc->sbhk", query, picked).float() * self.scale
        return picked, scores, (picks >= 0).unsqueeze(2)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """As MegatronModule's, except that attn_sink is split over tensor-parallel ranks by head."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded.update(
            make_sharded_tensors_for_checkpoint(
                {"attn_sink": self.attn_sink},
                prefix,
                {"attn_sink": 0},
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        return sharded
