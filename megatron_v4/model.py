"""`DeepSeekV4Model`: the DeepSeek-V4 language model as a Megatron-Core LanguageModule.

Behaves like Megatron-Core's GPTModel: `forward(input_ids, position_ids,
attention_mask, labels)` returns logits [batch, seq, vocab] without labels and
the per-token loss [batch, seq] with labels (labels are the next tokens, as in
Megatron). Embedding and output layer are untied. With `mtp_num_layers`, the
MTP loss is added to the gradients (see `megatron_v4.mtp`) when labels are given.

Parallelism (see `megatron_v4.config` for the sizes it accepts):
- tensor: attention heads, output groups and indexer heads, the shared
  expert, MTP's projections, embedding and output layer are split; the KV
  head, compressors, q_down, norms and mHC parameters are replicated.
  Training needs `sequence_parallel=True` with TP > 1 (Megatron-Core's MoE);
  the attention gathers the sequence at its entry (its window, compressors
  and indexer need every earlier token).
- context: every sequence split into contiguous chunks, one per CP rank
  (`megatron_v4.context_parallel`); the attention gathers the key side of
  earlier chunks, MTP's shift reads the next chunk's first token.
- expert: Megatron-Core's dispatchers (allgather, alltoall) and experts; hash
  routing reads the token ids of the tokens this rank routes.
- pipeline: `pre_process` stages embed, the others take the previous stage's
  streams through `set_input_tensor`; `post_process` stages collapse the
  streams, run MTP and the output layer. Every stage gets the token ids as
  `input_ids` (hash routing, and MTP's embedding on the last stage). Between
  stages the hc_mult residual streams travel as one 3-d tensor
  [seq, batch * hc_mult, hidden] (a view, no copy), which is what
  Megatron-Core's schedules send: run them with
  `micro_batch_size=pipeline_micro_batch_size(config, batch)` (their receive
  buffers are [seq_length, micro_batch_size, hidden_size]).
  Interleaved schedules: build one model per virtual stage with
  `vp_stage=i`, `pre_process=is_pipeline_first_stage(ignore_virtual=False, vp_stage=i)`
  and `post_process=is_pipeline_last_stage(ignore_virtual=False, vp_stage=i)`,
  and give every chunk its own iterator over the same micro-batches.
`megatron_v4.forward_logits` runs the forward-only schedule at any layout.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType

from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.context_parallel import chunk_start
from megatron_v4.layer import DeepSeekV4BlockSubmodules, DeepSeekV4TransformerBlock
from megatron_v4.mtp import DeepSeekV4MTPBlock, DeepSeekV4MTPBlockSubmodules, attach_mtp_losses
from megatron_v4.packing import document_loss_mask, document_positions, document_spans
from megatron_v4.specs import get_dsv4_decoder_block_spec, get_dsv4_mtp_block_spec


def pipeline_micro_batch_size(config: DeepSeekV4TransformerConfig, micro_batch_size: int) -> int:
    """The `micro_batch_size` to give Megatron-Core's pipeline schedules for micro-batches of
    `micro_batch_size` sequences: between stages the hc_mult residual streams travel as one
    [seq, micro_batch_size * hc_mult, hidden] tensor, and the schedules size their receive buffers
    as [seq_length, micro_batch_size, hidden_size]."""
    return micro_batch_size * config.hc_mult


class DeepSeekV4Model(LanguageModule):
    """DeepSeek-V4 (V4-Flash, V4-Pro, or smaller of the same design).

    Args:
        config: the model config; `config.vocab_size` is the vocabulary size.
        decoder_spec / mtp_spec: block specs; default to `get_dsv4_decoder_block_spec(config)`
            and (with `config.mtp_num_layers`) `get_dsv4_mtp_block_spec(config)`.
        pre_process / post_process: this pipeline stage embeds / produces the outputs.
        parallel_output: keep logits split over the tensor-parallel ranks (as GPTModel).
    """

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        decoder_spec: DeepSeekV4BlockSubmodules | None = None,
        mtp_spec: DeepSeekV4MTPBlockSubmodules | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        max_sequence_length: int = 1 << 20,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        if not config.vocab_size:
            raise ValueError("DeepSeekV4Model needs config.vocab_size")
        self.vocab_size = config.vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = False
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.mtp_process = bool(config.mtp_num_layers) and post_process

        if self.pre_process or self.mtp_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=self.vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type="none",
                tp_group=self.pg_collection.tp,
            )
        self.decoder = DeepSeekV4TransformerBlock(
            config=config,
            spec=decoder_spec or get_dsv4_decoder_block_spec(config),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if self.mtp_process:
            self.mtp = DeepSeekV4MTPBlock(
                config=config,
                spec=mtp_spec or get_dsv4_mtp_block_spec(config),
                pg_collection=self.pg_collection,
            )
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
                tp_group=self.pg_collection.tp,
            )
        if self.pre_process or self.post_process or self.mtp_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """The previous pipeline stage's output, [seq, batch * hc_mult, hidden]."""
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if input_tensor is not None:
            input_tensor = input_tensor.unflatten(1, (-1, self.config.hc_mult))
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        inference_context=None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab], or per-token loss [batch, seq] with labels.

        position_ids default to 0..seq-1 (under context parallelism, `input_ids` is this rank's contiguous
        chunk of the sequence and they default to the chunk's positions in it). `loss_mask` [batch, seq]
        masks the MTP loss; the returned main loss is unmasked (the caller's loss function masks it, as with GPTModel).
        `decoder_input` replaces the embedding on the first stage.
        `inference_context` (a `megatron_v4.inference.DeepSeekV4InferenceContext`) makes the attention
        layers keep / use their decode state; positions then default to start at its
        `sequence_len_offset`.
        `packed_seq_params` (`megatron_v4.packing.packed_seq_params(cu_seqlens)`): input_ids [1, T] is a
        packed row of documents (under context parallelism, this rank's chunk of it; cu_seqlens
        always describe the whole row). Each document gets what it gets alone: positions restart at its
        start (position_ids, if given, must say so), attention and MTP stay inside it, and the last
        token of each document is left out of both losses (its returned per-token loss is 0; the
        caller's loss_mask should leave it out of its token count, `megatron_v4.packing.document_loss_mask`).
        """
        boundary_mask = None
        if packed_seq_params is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"a packed row is one sequence: input_ids must be [1, T], got {list(input_ids.shape)}")
            # Under context parallelism input_ids is this rank's chunk; packed_seq_params describe the whole row.
            chunk = input_ids.shape[1]
            first = chunk_start(chunk, self.pg_collection.cp)
            rows = slice(first, first + chunk)
            cu_seqlens = packed_seq_params.cu_seqlens_q.to(input_ids.device)
            document_spans(packed_seq_params, chunk * self.pg_collection.cp.size())
            restarting = document_positions(cu_seqlens)[rows].unsqueeze(0)
            if position_ids is not None and not torch.equal(position_ids.to(restarting.device), restarting):
                raise ValueError(
                    "position_ids of a packed row must restart at 0 at every document start; "
                    "pass None (they follow from cu_seqlens) or megatron_v4.packing.document_positions"
                )
            position_ids = restarting
            boundary_mask = document_loss_mask(cu_seqlens)[rows].unsqueeze(0)
        if position_ids is None:
            seq = input_ids.shape[1]
            if inference_context is not None:
                start = inference_context.sequence_len_offset
            else:
                start = chunk_start(seq, self.pg_collection.cp)
            position_ids = torch.arange(start, start + seq, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
        streams = self.decoder(
            decoder_input,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_ids=input_ids,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return streams.flatten(1, 2)

        hidden_states = self.decoder.collapse_streams(streams)
        if self.mtp_process and labels is not None:
            mtp_hidden_states = self.mtp(
                streams,
                input_ids,
                self.embedding,
                attention_mask=attention_mask,
                position_ids=position_ids,
                packed_seq_params=packed_seq_params,
                boundary_mask=boundary_mask,
            )
            hidden_states = attach_mtp_losses(
                hidden_states,
                mtp_hidden_states,
                labels,
                loss_mask,
                boundary_mask,
                self.output_layer,
                self.compute_language_model_loss,
                self.config,
                cp_group=self.pg_collection.cp,
                tp_group=self.pg_collection.tp,
                is_training=self.training,
            )

        logits, _ = self.output_layer(hidden_states)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = self.compute_language_model_loss(labels, logits)
        return loss if boundary_mask is None else loss * boundary_mask
