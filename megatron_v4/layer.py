"""The DeepSeek-V4 decoder layer and decoder block, with the mHC residual.

Layout: Megatron-Core's [seq, batch, ...]. Between layers the residual is the
n hyper-connection streams, [seq, batch, hc_mult, hidden]; each sublayer sees
one collapsed [seq, batch, hidden] input:

    x, post, comb = hc_attn(X);  X = post (x) self_attention(input_layernorm(x)) + comb^T X
    x, post, comb = hc_ffn(X);   X = post (x) mlp(pre_mlp_layernorm(x), token_ids) + comb^T X

The block copies the embedding into the n streams, runs its layers and, on the
stage that owns the end of the decoder, collapses the streams with `hc_head`
and `final_layernorm` (`collapse_streams`).

Token ids: the hash-routed MoE layers choose experts by token id, so the
block's forward takes `token_ids` ([batch, seq], as the data iterator gives
them on every pipeline stage) and hands each layer the [seq, batch] ids of the
tokens it holds (this rank's slice under sequence parallelism).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import MlpBuilder, get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.hyper_connection import HyperConnection, HyperHead


@dataclass
class DeepSeekV4LayerSubmodules:
    """What a decoder layer is built from (see `megatron_v4.specs`)."""

    input_layernorm: ModuleSpec | type
    self_attention: ModuleSpec | type
    pre_mlp_layernorm: ModuleSpec | type
    mlp: MlpBuilder


class DeepSeekV4TransformerLayer(MegatronModule):
    """One decoder layer: attention and MoE, each wrapped in a hyper-connection.

    `layer_number` is the global 1-based decoder layer number (the MTP depth for
    MTP layers, as in Megatron-Core).
    """

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        submodules: DeepSeekV4LayerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number
        hidden, eps = config.hidden_size, config.layernorm_epsilon

        self.hc_attn = HyperConnection(config)
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=hidden, eps=eps
        )
        self.self_attention = build_module(
            submodules.self_attention,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
        )
        self.hc_ffn = HyperConnection(config)
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=hidden, eps=eps
        )
        self.mlp = submodules.mlp(
            config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer
        )
        if hasattr(self.mlp, "set_layer_number"):
            self.mlp.set_layer_number(layer_number)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        inference_context=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """hidden_states: streams [seq, batch, n, hidden] -> streams of the same shape.

        position_ids [batch, seq] (full sequence), token_ids [seq, batch] (this rank's tokens),
        inference_context: a `DeepSeekV4InferenceContext` when decoding (see `megatron_v4.decode_state`),
        packed_seq_params: the documents of a packed row (see `megatron_v4.packing`).
        """
        x, post, comb = self.hc_attn(hidden_states)
        attention_output, _ = self.self_attention(
            self.input_layernorm(x),
            attention_mask=attention_mask,
            position_ids=position_ids,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
        )
        hidden_states = HyperConnection.expand(attention_output, hidden_states, post, comb)

        x, post, comb = self.hc_ffn(hidden_states)
        mlp_output, _ = self.mlp(self.pre_mlp_layernorm(x), token_ids=token_ids)
        return HyperConnection.expand(mlp_output, hidden_states, post, comb)


@dataclass
class DeepSeekV4BlockSubmodules:
    """One layer spec per decoder layer of the whole model, and the final norm."""

    layer_specs: list[ModuleSpec]
    layer_norm: ModuleSpec | type


class DeepSeekV4TransformerBlock(MegatronModule):
    """The decoder: the layers of this pipeline stage, plus hc_head and final_layernorm on the last.

    `spec.layer_specs` holds a spec for every decoder layer of the model; the
    block builds the ones of its pipeline (and virtual pipeline) stage.
    """

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        spec: DeepSeekV4BlockSubmodules,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        if len(spec.layer_specs) != config.num_layers:
            raise ValueError(
                f"the block spec has {len(spec.layer_specs)} layer specs for num_layers="
                f"{config.num_layers}; build it with get_dsv4_decoder_block_spec(config)"
            )
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.input_tensor = None

        pp_rank = get_pg_rank(pg_collection.pp)
        self.layer_offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        num_local = get_num_layers_to_build(config, vp_stage, pp_rank)
        self.layers = torch.nn.ModuleList(
            build_module(
                spec.layer_specs[self.layer_offset + i],
                config=config,
                layer_number=self.layer_offset + i + 1,
                pg_collection=pg_collection,
            )
            for i in range(num_local)
        )
        if post_process:
            self.hc_head = HyperHead(config)
            self.final_layernorm = build_module(
                spec.layer_norm,
                config=config,
                hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Pipeline stages after the first take their input streams from the previous stage."""
        self.input_tensor = input_tensor

    def local_token_ids(self, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """[batch, seq] ids -> the [seq, batch] ids of this rank's tokens (its sequence-parallel slice)."""
        if token_ids is None:
            return None
        token_ids = token_ids.transpose(0, 1)
        if self.config.sequence_parallel:
            tp_size = get_pg_size(self.tp_group)
            token_ids = token_ids.chunk(tp_size, dim=0)[get_pg_rank(self.tp_group)]
        return token_ids.contiguous()

    def _run_layers(
        self,
        streams,
        attention_mask,
        position_ids,
        token_ids,
        *,
        first,
        last,
        inference_context=None,
        packed_seq_params=None,
    ):
        for layer in self.layers[first:last]:
            streams = layer(
                streams,
                attention_mask,
                position_ids,
                token_ids,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
            )
        return streams

    def _layer_spans(self) -> list[tuple[int, int, bool]]:
        """(first, last, recompute) spans of layers, following Megatron's full-recompute settings:
        `uniform` checkpoints every group of `recompute_num_layers` layers, `block` checkpoints
        the first `recompute_num_layers` layers one by one."""
        count = len(self.layers)
        if not (self.config.recompute_granularity == "full" and self.training):
            return [(0, count, False)]
        chunk = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            return [(i, min(i + chunk, count), True) for i in range(0, count, chunk)]
        return [(i, i + 1, i < chunk) for i in range(count)]

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        inference_context=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Embeddings [seq, batch, hidden] (first stage; else the received streams) -> streams.

        Returns the streams [seq, batch, n, hidden] after this stage's layers;
        `collapse_streams` turns the final ones into the decoder output.
        """
        if self.pre_process:
            streams = hidden_states.unsqueeze(-2).expand(
                *hidden_states.shape[:-1], self.config.hc_mult, hidden_states.shape[-1]
            )
            streams = streams.contiguous()
        else:
            streams = self.input_tensor
        token_ids = self.local_token_ids(token_ids)
        for first, last, recompute in self._layer_spans():
            run = functools.partial(
                self._run_layers,
                first=first,
                last=last,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
            )
            args = (streams, attention_mask, position_ids, token_ids)
            streams = tensor_parallel.checkpoint(run, False, *args) if recompute else run(*args)
        return streams

    def collapse_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """Final streams [seq, batch, n, hidden] -> final_layernorm(hc_head(streams)) [seq, batch, hidden]."""
        return self.final_layernorm(self.hc_head(streams))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Layers keyed by their global number (layers differ, so no stacking across PP stages)."""
        sharded_state_dict = {}
        for i, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{i}."
            global_prefix = f"{prefix}layers.{layer.layer_number - 1}."
            layer_sd = layer.sharded_state_dict(local_prefix, sharded_offsets, metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, global_prefix)
            sharded_state_dict.update(layer_sd)
        for name, module in self.named_children():
            if module is not self.layers:
                sharded_state_dict.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        return sharded_state_dict
