"""Lightning indexer of DeepSeek-V4's CSA layers (DeepSeek-V3.2 report, section 2.1).

For every query token t the indexer picks which compressed entries the CSA
attention reads:

- q^I_t = linear_q_up_proj(c_q,t) viewed [index_n_heads, index_head_dim], RoPE on its
  last r channels at the token's position (compressed-layer frequencies);
- K^I = the indexer's own compressor (same windows as the attention's, width
  index_head_dim);
- w_t = linear_weights_proj(x_t) * index_head_dim^-1/2 * index_n_heads^-1/2;
- score I_{t,w} = sum_h w_{t,h} * ReLU(q^I_{t,h} . K^I_w), -inf where entry w is not
  visible yet (w >= (t + 1) // m); keep the top min(index_topk, #entries).

The choice is discrete, so the picks carry no gradient (as in transformers) and
are made without autograd. The indexer learns from its own distillation loss
(`distillation_loss`, see `megatron_v4.indexer_loss`), which differentiates the
scores I of the candidate entries. Indexer heads are split over tensor
parallelism; their partial sums are all-reduced before the top-k and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch.utils.checkpoint import checkpoint

from megatron_v4.config import CSA, DeepSeekV4TransformerConfig
from megatron_v4.decode_state import CompressorDecodeState
from megatron_v4.indexer_loss import kl_to_teacher
from megatron_v4.rope import DeepSeekV4RotaryEmbedding, apply_rotary

# Queries scored at once: bounds the transient [block, batch, heads, entries] score tensor (and,
# in the loss, what the backward keeps: each block's scores are recomputed there).
QUERY_BLOCK = 128


@dataclass
class DeepSeekV4IndexerSubmodules:
    """Per-head (column-parallel) projections and the indexer's own compressor."""

    linear_q_up_proj: ModuleSpec | type = None
    linear_weights_proj: ModuleSpec | type = None
    compressor: ModuleSpec | type = None


class DeepSeekV4Indexer(MegatronModule):
    """forward(hidden_states [s, b, D], q_compressed [s, b, q_lora_rank], positions [s, b])
    -> indices [s, b, k] (int64) of the chosen entries, -1 where a pick is not visible."""

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        submodules: DeepSeekV4IndexerSubmodules,
        tp_group: dist.ProcessGroup,
    ):
        super().__init__(config=config)
        self.tp_group = tp_group
        tp_size = tp_group.size()
        if config.index_n_heads % tp_size:
            raise ValueError(
                f"index_n_heads={config.index_n_heads} is not divisible by the tensor-parallel size "
                f"{tp_size}; choose a tensor-parallel size that divides it"
            )
        self.local_heads = config.index_n_heads // tp_size
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        column_parallel_kwargs = dict(
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_group=tp_group,
        )
        self.linear_q_up_proj = build_module(
            submodules.linear_q_up_proj,
            config.q_lora_rank,
            config.index_n_heads * config.index_head_dim,
            tp_comm_buffer_name="indexer_q_up_proj",
            **column_parallel_kwargs,
        )
        self.linear_weights_proj = build_module(
            submodules.linear_weights_proj,
            config.hidden_size,
            config.index_n_heads,
            tp_comm_buffer_name="indexer_weights_proj",
            **column_parallel_kwargs,
        )
        self.compressor = build_module(
            submodules.compressor, config=config, compress_ratio=CSA, head_dim=config.index_head_dim
        )
        self.rotary = DeepSeekV4RotaryEmbedding(config, compressed=True)
        self.weight_scale = config.index_head_dim**-0.5 * config.index_n_heads**-0.5

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        q_compressed: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`keys`: the indexer compressor's output on `hidden_states`, if the caller already has it."""
        seq_len, batch, _ = hidden_states.shape
        if keys is None:
            keys = self.compressor(hidden_states)
        keys = keys.float()  # [entries, b, index_head_dim]
        num_entries = keys.shape[0]
        if num_entries == 0:
            return torch.empty(seq_len, batch, 0, dtype=torch.long, device=hidden_states.device)
        queries, head_weights = self._query_terms(hidden_states, q_compressed, positions)
        visible_entries = (positions + 1) // CSA  # [s, b]: entries w < this are complete
        entry_ids = torch.arange(num_entries, device=hidden_states.device)
        topk = min(self.topk, num_entries)
        picks = []
        for start in range(0, seq_len, QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            scores = self._scores(queries[block], head_weights[block], keys)
            hidden = entry_ids >= visible_entries[block].unsqueeze(-1)
            scores = scores.masked_fill(hidden, float("-inf"))
            chosen = scores.topk(topk, dim=-1).indices
            picks.append(chosen.masked_fill(chosen >= visible_entries[block].unsqueeze(-1), -1))
        return torch.cat(picks, dim=0)

    @torch.no_grad()
    def decode_step(
        self,
        hidden_state: torch.Tensor,
        q_compressed: torch.Tensor,
        position: int,
        state: CompressorDecodeState,
    ) -> torch.Tensor:
        """Picks [b, k] for the token at `position` (hidden_state [b, D], q_compressed [b, q_lora_rank]).

        Extends the indexer compressor's `state` by the token first; every stored key is then
        complete, hence visible, so no mask is needed.
        """
        self.compressor.decode_step(hidden_state, position, state)
        keys = state.emitted.float()
        if keys.shape[0] == 0:
            return torch.empty(hidden_state.shape[0], 0, dtype=torch.long, device=hidden_state.device)
        positions = torch.full((1, hidden_state.shape[0]), position, device=hidden_state.device)
        queries, head_weights = self._query_terms(hidden_state.unsqueeze(0), q_compressed.unsqueeze(0), positions)
        scores = self._scores(queries, head_weights, keys)[0]
        return scores.topk(min(self.topk, keys.shape[0]), dim=-1).indices

    def _query_terms(self, hidden_states, q_compressed, positions):
        """Rotated float32 queries [s, b, local heads, index_head_dim] and head weights [s, b, local heads]."""
        seq_len, batch, _ = hidden_states.shape
        queries = self.linear_q_up_proj(q_compressed)[0].view(seq_len, batch, self.local_heads, self.head_dim)
        cos, sin = self.rotary(positions)
        queries = apply_rotary(queries, cos.unsqueeze(2), sin.unsqueeze(2)).float()
        head_weights = self.linear_weights_proj(hidden_states)[0].float() * self.weight_scale
        return queries, head_weights

    def _scores(self, queries, head_weights, keys):
        """score [q, b, n] = sum over all heads (all ranks) of w * ReLU(q . k), against keys
        shared by all queries [n, b, d] or per query [q, b, n, d]."""
        pattern = "qbhd,nbd->qbhn" if keys.dim() == 3 else "qbhd,qbnd->qbhn"
        per_head = torch.einsum(pattern, queries, keys).relu()
        scores = torch.einsum("qbhn,qbh->qbn", per_head, head_weights)
        return reduce_from_tensor_model_parallel_region(scores, group=self.tp_group)

    def distillation_loss(
        self,
        hidden_states: torch.Tensor,
        q_compressed: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        teacher_mass: torch.Tensor,
        picks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over queries of KL(teacher || softmax of the scores I) over each query's candidates.

        `keys`: this compressor's entries on the detached `hidden_states`. Dense loss
        (`picks=None`): the candidates are the visible entries, `teacher_mass` [s, b, n]. Sparse
        loss: the candidates are `picks` [s, b, k] (-1: none), `teacher_mass` [s, b, k]. The
        teacher mass is the attention's head-summed probability of each candidate.
        """
        queries, head_weights = self._query_terms(hidden_states.detach(), q_compressed.detach(), positions)
        # Replicated keys feed this rank's heads only: their gradient is summed over the ranks.
        keys = copy_to_tensor_model_parallel_region(keys.float(), group=self.tp_group)
        if picks is None:
            visible_entries = (positions + 1) // CSA
            candidates = torch.arange(keys.shape[0], device=keys.device) < visible_entries.unsqueeze(-1)
        else:
            candidates = picks >= 0
        total = keys.new_zeros(())
        for start in range(0, hidden_states.shape[0], QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            block_picks = None if picks is None else picks[block]
            total = total + checkpoint(
                self._block_loss,
                queries[block],
                head_weights[block],
                keys,
                teacher_mass[block],
                candidates[block],
                block_picks,
                use_reentrant=False,
            )
        return total

    def _block_loss(self, queries, head_weights, keys, teacher_mass, candidates, picks):
        if picks is not None:
            batch_ids = torch.arange(keys.shape[1], device=keys.device).view(1, -1, 1)
            keys = keys.transpose(0, 1)[batch_ids, picks.clamp(min=0)]  # [q, b, k, d]
        return kl_to_teacher(teacher_mass, self._scores(queries, head_weights, keys), candidates)
