"""DeepSeek-V4 multi-token prediction (MTP).

MTP layer k sees the decoder's final streams H (before `hc_head`), or the
previous MTP layer's streams, and the embedding of the token one further
ahead; at position t it predicts token t + 2 + k:

    e = enorm(embed(token_{t+1+k}))
    X_j = e_proj(e) + h_proj(hnorm(H_j))           (for every stream j)
    X = transformer_layer(X)                       (sliding-window attention, learned routing)
    hidden = final_layernorm(hc_head(X))           -> shared output layer

The embedding and the output layer are the main model's. The training loss
(`attach_mtp_losses`) is Megatron-Core's (`process_mtp_loss`): cross entropy on
labels rolled k+1 more positions, mean over the valid tokens, times
`mtp_loss_scaling_factor / mtp_num_layers`, attached to the main hidden
states with `MTPLossAutoScaler` so that its gradient flows in the main
loss's backward without changing the returned main loss. Our own copy of it
rolls the contiguous context-parallel split (`megatron_v4.context_parallel`):
the shift by one reads the next chunk's first token, stops at document ends in a
packed row (`megatron_v4.packing`), and the mean runs over the valid tokens of
the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
    _compute_mtp_acceptance_counts,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.context_parallel import context_parallel_group, roll_left
from megatron_v4.hyper_connection import HyperHead


@dataclass
class DeepSeekV4MTPLayerSubmodules:
    """What an MTP layer is built from (see `megatron_v4.specs.get_dsv4_mtp_block_spec`)."""

    enorm: ModuleSpec | type
    hnorm: ModuleSpec | type
    e_proj: ModuleSpec | type
    h_proj: ModuleSpec | type
    transformer_layer: ModuleSpec
    layer_norm: ModuleSpec | type


class DeepSeekV4MTPLayer(MegatronModule):
    """One MTP depth (see the module docstring)."""

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        submodules: DeepSeekV4MTPLayerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        hidden, eps = config.hidden_size, config.layernorm_epsilon
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp

        self.enorm = build_module(submodules.enorm, config=config, hidden_size=hidden, eps=eps)
        self.hnorm = build_module(submodules.hnorm, config=config, hidden_size=hidden, eps=eps)
        projection = dict(
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_group=pg_collection.tp,
        )
        self.e_proj = build_module(submodules.e_proj, hidden, hidden, **projection)
        self.h_proj = build_module(submodules.h_proj, hidden, hidden, **projection)
        # Numbered by MTP depth, as in Megatron-Core (its routers add num_layers for their logs).
        self.transformer_layer = build_module(
            submodules.transformer_layer,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=True,
        )
        self.hc_head = HyperHead(config)
        self.final_layernorm = build_module(
            submodules.layer_norm, config=config, hidden_size=hidden, eps=eps
        )

    @property
    def mtp_model_layer(self) -> torch.nn.Module:
        """Megatron-Core's name for the inner layer (its schedules set `current_microbatch` on it)."""
        return self.transformer_layer

    def _combine(self, embeddings: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """e_proj(enorm(e)) broadcast over the streams + h_proj(hnorm(H)), on this rank's tokens."""
        seq, batch, n, hidden = streams.shape
        e, _ = self.e_proj(self.enorm(embeddings))
        h, _ = self.h_proj(self.hnorm(streams).reshape(seq, batch * n, hidden))
        combined = e.unsqueeze(-2) + h.reshape(*h.shape[:1], batch, n, -1)
        combined = gather_from_tensor_model_parallel_region(combined, group=self.tp_group)
        if self.config.sequence_parallel:
            combined = scatter_to_sequence_parallel_region(combined, group=self.tp_group)
        return combined

    def forward(
        self,
        streams: torch.Tensor,
        embeddings: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """streams [seq, batch, n, hidden], embeddings of the next tokens [seq, batch, hidden]
        -> (this layer's streams, its output hidden states [seq, batch, hidden])."""
        streams = self._combine(embeddings, streams)
        streams = self.transformer_layer(
            streams, attention_mask, position_ids, token_ids=None, packed_seq_params=packed_seq_params
        )
        return streams, self.final_layernorm(self.hc_head(streams))


@dataclass
class DeepSeekV4MTPBlockSubmodules:
    layer_specs: list[ModuleSpec]


class DeepSeekV4MTPBlock(MegatronModule):
    """The `mtp_num_layers` MTP layers, chained (layer k+1 reads layer k's streams)."""

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        spec: DeepSeekV4MTPBlockSubmodules,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config)
        self.cp_group = context_parallel_group(pg_collection)
        if len(spec.layer_specs) != config.mtp_num_layers:
            raise ValueError(
                f"the MTP block spec has {len(spec.layer_specs)} layers for mtp_num_layers="
                f"{config.mtp_num_layers}; build it with get_dsv4_mtp_block_spec(config)"
            )
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=k + 1, pg_collection=pg_collection)
            for k, layer_spec in enumerate(spec.layer_specs)
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Each MTP layer's own (tensor-parallel aware) sharded state dict, keyed `layers.{k}.`."""
        sharded_state_dict = {}
        for k, layer in enumerate(self.layers):
            layer_prefix = f"{prefix}layers.{k}."
            sharded_state_dict.update(layer.sharded_state_dict(layer_prefix, sharded_offsets, metadata))
        return sharded_state_dict

    def forward(
        self,
        streams: torch.Tensor,
        input_ids: torch.Tensor,
        embedding: torch.nn.Module,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed_seq_params=None,
        boundary_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Decoder streams, input_ids [batch, seq] -> one output hidden state per MTP layer.

        In a packed row (`packed_seq_params`, with `boundary_mask` [1, seq] 0 at each document's last
        token) the ids shift within each document: a document's last token gets id 0 as it would alone
        (its MTP target lies beyond the document; the loss masks it).
        """
        outputs = []
        for layer in self.layers:
            input_ids = roll_left(input_ids, self.cp_group, boundary_mask)
            embeddings = embedding(input_ids=input_ids, position_ids=position_ids)
            streams, hidden = layer(streams, embeddings, attention_mask, position_ids, packed_seq_params)
            outputs.append(hidden)
        return outputs


def attach_mtp_losses(
    hidden_states: torch.Tensor,
    mtp_hidden_states: list[torch.Tensor],
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    boundary_mask: torch.Tensor | None,
    output_layer: torch.nn.Module,
    compute_language_model_loss,
    config: DeepSeekV4TransformerConfig,
    cp_group,
    tp_group,
    is_training: bool,
) -> torch.Tensor:
    """`hidden_states` [s, b, h] carrying the MTP losses for the backward (Megatron-Core's
    `process_mtp_loss` on a contiguous context-parallel split).

    Each MTP layer's loss is the mean over the valid tokens of the whole sequence; a CP rank
    attaches its share times the CP size (DDP averages the gradients over the CP ranks) and
    logs the whole sequence's mean. In a packed row, `boundary_mask` (0 at each document's last token)
    keeps the shifts inside documents and the targets off the next document."""
    cp = cp_group.size()
    loss_mask = torch.ones_like(labels) if loss_mask is None else loss_mask
    if boundary_mask is not None:
        loss_mask = loss_mask * boundary_mask
    scale = config.mtp_loss_scaling_factor / config.mtp_num_layers
    for depth, mtp_hidden in enumerate(mtp_hidden_states):
        logits, _ = output_layer(mtp_hidden)
        labels = roll_left(labels, cp_group, boundary_mask)
        loss_mask = roll_left(loss_mask, cp_group, boundary_mask)
        num_tokens = loss_mask.sum().float()
        if cp > 1:
            torch.distributed.all_reduce(num_tokens, group=cp_group)
        mtp_loss = loss_mask * compute_language_model_loss(labels, logits)
        share = mtp_loss / num_tokens.clamp(min=1)
        if is_training:
            logged = share.sum().detach()
            if cp > 1:
                torch.distributed.all_reduce(logged, group=cp_group)
            correct, total = _compute_mtp_acceptance_counts(logits, labels, loss_mask, output_layer, None, tp_group)
            MTPLossLoggingHelper.save_metrics_to_tracker(
                logged,
                correct,
                total,
                depth,
                config.mtp_num_layers,
                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            )
        hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * cp * share)
    return hidden_states
