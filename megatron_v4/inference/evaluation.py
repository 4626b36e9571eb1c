"""`forward_logits`: full-vocabulary logits from a DeepSeek-V4 model at any parallel layout.

The one call evaluation scripts and tests use. It runs Megatron-Core's own
forward-only pipeline schedule over the model chunks this rank holds, gathers
the vocabulary-parallel logits over the tensor-parallel ranks on the last
pipeline stage and broadcasts them to every stage, so every rank returns the
same [batch, seq, vocab] tensor for the batch it passed in (every rank of a
model-parallel or context-parallel group must pass the same `input_ids`;
data-parallel replicas may pass different ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_attr_wrapped_model

from megatron_v4.context_parallel import gather_chunks, local_chunk
from megatron_v4.model import pipeline_micro_batch_size
from megatron_v4.packing import document_positions, document_spans, packed_seq_params


@contextlib.contextmanager
def evaluation_mode(model_chunks) -> Iterator[None]:
    """Every module of the chunks in eval mode for the duration, then back to the mode it arrived in
    (a model fresh from `to_megatron_model` or a training loop is in train mode, where dropout and
    Megatron-Core's MoE training checks apply)."""
    modes = [(module, module.training) for chunk in model_chunks for module in chunk.modules()]
    for chunk in model_chunks:
        chunk.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids outside the vocabulary (an embedding lookup would fail deep inside the model)."""
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0].item()
        raise ValueError(f"token id {bad} is outside the model's vocabulary 0..{vocab_size - 1}")


def forward_logits(
    model_chunks,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    micro_batch_size: int | None = None,
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """input_ids [batch, seq] -> float32 logits [batch, seq, vocab] on every rank.

    cu_seqlens: input_ids [1, T] is one packed row of documents with these cumulative lengths
    (0, ..., T), also under context parallelism; every document's logits are those it gets alone
    (`megatron_v4.packing`).

    model_chunks: this rank's model chunks (one `DeepSeekV4Model`, or a list of them
    for interleaved pipelines; DDP/Float16Module wrappers are fine). They run in eval
    mode and are returned in the mode they arrived in.
    micro_batch_size: sequences per pipeline micro-batch; defaults to the whole batch
    without pipeline parallelism and to 1 with it (so the stages overlap; an
    interleaved schedule needs at least `pp` micro-batches).
    Under sequence parallelism `seq` must be divisible by the tensor-parallel size; under context
    parallelism every rank of a context-parallel group passes the whole sequence, runs its contiguous
    chunk of it, and returns the logits of the whole sequence (`seq` divisible by the CP size).
    """
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    config = get_attr_wrapped_model(chunks[0], "config")
    batch, full_seq = input_ids.shape
    check_token_ids(input_ids, get_attr_wrapped_model(chunks[0], "vocab_size"))
    packed = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(
                f"cu_seqlens describe one packed row: input_ids must be [1, T], got {list(input_ids.shape)}"
            )
        packed = packed_seq_params(cu_seqlens)
        document_spans(packed, full_seq)
        if position_ids is None:
            position_ids = document_positions(packed.cu_seqlens_q).unsqueeze(0)
    if position_ids is None:
        position_ids = torch.arange(full_seq, device=input_ids.device).unsqueeze(0).expand(batch, full_seq)
    cp_group = parallel_state.get_context_parallel_group()
    input_ids, position_ids = local_chunk(input_ids, 1, cp_group), local_chunk(position_ids, 1, cp_group)
    seq = input_ids.shape[1]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.sequence_parallel and seq % tp:
        raise ValueError(
            f"sequence length {seq} is not divisible by the tensor-parallel size {tp} "
            "(sequence parallelism splits it); pad the batch to a multiple of it"
        )
    micro_batch_size = micro_batch_size or (batch if pp == 1 else 1)
    if batch % micro_batch_size:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size={micro_batch_size}")
    num_microbatches = batch // micro_batch_size
    if len(chunks) > 1 and num_microbatches < pp:
        raise ValueError(
            f"an interleaved pipeline needs at least pp={pp} micro-batches, got {num_microbatches}; "
            f"pass a batch of >= {pp * micro_batch_size} sequences or a smaller micro_batch_size"
        )
    micro_batches = list(zip(input_ids.split(micro_batch_size), position_ids.split(micro_batch_size)))

    def keep_logits(logits, non_loss_data=True):
        return logits

    def forward_step(data_iterator, model):
        ids, positions = next(data_iterator)
        return model(ids, position_ids=positions, packed_seq_params=packed), keep_logits

    with torch.no_grad(), evaluation_mode(chunks):
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            # Every chunk reads the token ids: the first embeds them, all route hash layers by them.
            data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
            model=chunks,
            num_microbatches=num_microbatches,
            seq_length=full_seq,  # the schedules divide it by the CP (and, under SP, TP) size
            micro_batch_size=pipeline_micro_batch_size(config, micro_batch_size),
            forward_only=True,
            collect_non_loss_data=True,
        )

    vocab = get_attr_wrapped_model(chunks[-1], "vocab_size")
    logits = torch.empty(batch, seq, vocab, dtype=torch.float32, device=input_ids.device)
    if parallel_state.is_pipeline_last_stage():
        local = torch.cat(outputs, dim=0)  # [batch, seq, vocab / tp]
        if get_attr_wrapped_model(chunks[-1], "parallel_output"):
            local = gather_from_tensor_model_parallel_region(local.contiguous())
        logits.copy_(local)
    if pp > 1:
        last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logits, src=last_stage, group=parallel_state.get_pipeline_model_parallel_group())
    return gather_chunks(logits, 1, cp_group)
