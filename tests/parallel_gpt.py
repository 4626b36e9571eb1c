"""Rank functions for the runtime tests: plain Megatron-Core GPT models (local spec).

Every parallel run starts from the same full (single-rank) weights, slices them
for its layout using the partition attributes Megatron-Core sets on each
parameter, trains one step through Megatron-Core's schedules, DDP and
`finalize_model_grads`, and returns the gathered full gradients so the test can
compare them with a one-rank run on the same data.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

import megatron_v4
from layout_slicing import gather_slices, global_name, rank_slice

VOCAB, SEQ, MICRO_BATCH = 64, 8, 2


def build_gpt(moe: dict | None = None, num_layers: int = 2) -> GPTModel:
    layout = megatron_v4.layout()
    moe = moe or {}
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
        **moe,
        **layout.config_kwargs(),
    )
    spec = get_gpt_layer_local_spec(num_experts=moe.get("num_moe_experts"), moe_grouped_gemm=False)
    return GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )


def _global_name(name: str, module: GPTModel) -> str:
    """Local parameter name -> name in the one-rank model (layer and expert offsets)."""
    return global_name(
        name, lambda i: i + module.decoder.layers[0].layer_number - 1, module.config.num_moe_experts
    )


def _tp_group(param):
    if getattr(param, "allreduce", True):
        return parallel_state.get_tensor_model_parallel_group()
    return parallel_state.get_expert_tensor_parallel_group()


def load_full_weights(model: GPTModel, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of each full tensor into the model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = full[_global_name(name, model)]
            param.copy_(rank_slice(param, value, _tp_group(param), gate_up=False))  # fc1 not gated


def gather_full(model: GPTModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's tensors (keyed by local parameter name) -> full tensors by global name."""
    out = {}
    for name, param in model.named_parameters():
        value = gather_slices(param, tensors[name], _tp_group(param), gate_up=False)
        out[_global_name(name, model)] = value.clone()
    return out


def microbatches(count: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"tokens": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g),
         "labels": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)}
        for _ in range(count)
    ]


def _loss(output_tensor):
    loss = output_tensor.float().mean()
    # clone: the schedule divides the returned loss in place by the number of microbatches
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    output = model(batch["tokens"], positions, None, labels=batch["labels"])
    return output, _loss


def train_step(layout: dict, full: dict | None, moe: dict | None, num_microbatches: int,
               total_microbatches: int, num_layers: int = 2) -> dict:
    """One forward/backward at `layout`; returns loss, full gradients and full weights.

    Data-parallel rank r takes its share of `total_microbatches`, so every layout
    sees the same global batch. With `full=None` (the reference), it returns the
    weights it initialised so the other layouts can start from them.
    """
    megatron_v4.initialize(**layout)
    try:
        model = build_gpt(moe, num_layers)
        if full is not None:
            load_full_weights(model, full)
        weights = gather_full(model, dict(model.named_parameters()))
        ddp = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            model,
        )
        ddp.zero_grad_buffer()
        dp_rank = parallel_state.get_data_parallel_rank()
        data = microbatches(total_microbatches)
        mine = data[dp_rank * num_microbatches:(dp_rank + 1) * num_microbatches]
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(mine),
            model=[ddp],
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        finalize_model_grads([ddp])
        grads = gather_full(model, {n: p.main_grad for n, p in model.named_parameters()})
        loss = None
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([x["loss"] for x in losses]).mean()
            # Global mean over data-parallel replicas, as the reference computes it.
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= parallel_state.get_data_parallel_world_size()
        return {"loss": loss, "grads": grads, "weights": weights}
    finally:
        megatron_v4.destroy()


def save_checkpoint(layout: dict, full: dict, directory: str) -> None:
    megatron_v4.initialize(**layout)
    try:
        model = build_gpt()
        load_full_weights(model, full)
        dist_checkpointing.save(model.sharded_state_dict(), directory)
    finally:
        megatron_v4.destroy()


def load_checkpoint(layout: dict, directory: str) -> dict:
    megatron_v4.initialize(**layout)
    try:
        model = build_gpt()
        for param in model.parameters():
            param.data.zero_()
        state = dist_checkpointing.load(model.sharded_state_dict(), directory)
        model.load_state_dict(state)
        return gather_full(model, dict(model.named_parameters()))
    finally:
        megatron_v4.destroy()


def fail_while_peer_waits(rank_to_fail: int) -> int:
    """One rank raises; the others block in a barrier that can never complete."""
    megatron_v4.initialize()
    rank = dist.get_rank()
    if rank == rank_to_fail:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier()
    return rank


def die_while_peer_waits() -> None:
    """Rank 1 exits without a word (as if killed); rank 0 blocks in a barrier."""
    megatron_v4.initialize()
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def sleep_forever() -> None:
    time.sleep(3600)


def world_and_layout(layout: dict) -> tuple[int, int, int]:
    lay = megatron_v4.initialize(**layout)
    try:
        return dist.get_rank(), lay.dp, parallel_state.get_tensor_model_parallel_rank()
    finally:
        megatron_v4.destroy()
