"""One optimizer step through Megatron-Core's schedules (any pipeline size), with the losses reduced
over the whole world."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_v4.context_parallel import local_chunk
from megatron_v4.indexer_loss import IndexerLossTracker
from megatron_v4.model import pipeline_micro_batch_size
from megatron_v4.packing import packed_seq_params
from megatron_v4.training.data import DataOrder


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Token-summed loss and token count: the schedule divides by the count, the logs reduce both.

    Under context parallelism the count is the whole sequence's and the loss is this chunk's sum times
    the CP size: DDP averages the gradients over the CP ranks, whose sums add up to the sequence's."""
    loss_mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum()
    cp_group = parallel_state.get_context_parallel_group()
    if cp_group.size() > 1:
        num_tokens = num_tokens.clone()
        dist.all_reduce(num_tokens, group=cp_group)
    report = {"lm loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}
    return loss_sum * cp_group.size(), num_tokens.to(torch.int), report


def _forward_step(data_iterator, model):
    """One micro-batch of whole sequences; under context parallelism this rank's contiguous chunk of them.

    A packed micro-batch is one row (see DataOrder.micro_batches) whose cu_seqlens describe the whole row
    at every CP size; its documents stay apart in the model."""
    cp_group = parallel_state.get_context_parallel_group()
    batch = next(data_iterator)
    cu_seqlens = batch.pop("cu_seqlens", None)
    batch = {k: local_chunk(v.to(_device()), 1, cp_group) for k, v in batch.items()}
    packed = None if cu_seqlens is None else packed_seq_params(cu_seqlens[0].to(_device()))
    per_token_loss = model(
        batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], packed_seq_params=packed
    )
    return per_token_loss, lambda output: _loss_func(batch["loss_mask"], output)


def prepare_for_training(model: DistributedDataParallel, optimizer) -> None:
    """Hook the gradient finalisation (DP reduction, SP/embedding all-reduces, expert-bias update) and the
    loss scale into the model config, where Megatron-Core's schedules look for them."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync


def indexer_loss(model, num_microbatches: int) -> float | None:
    """The lightning indexer's distillation loss (KL, before its coefficient) of the step just run, mean
    over CSA layers and micro-batches, identical on every rank; None when the run has none."""
    coeff = model.config.indexer_loss_coeff
    mean = IndexerLossTracker.step_mean(num_microbatches).item() if coeff else None
    IndexerLossTracker.reset()
    return None if mean is None else mean / coeff


def _run_schedule(model, dataset, order: DataOrder, step: int, seq_length: int, forward_only: bool):
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=order.micro_batches(dataset, step),
        model=[model],
        num_microbatches=order.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=pipeline_micro_batch_size(model.config, order.micro_batch_size),
        forward_only=forward_only,
    )


def _reduced_losses(outputs, order: DataOrder) -> tuple[float, float | None]:
    """(LM loss, MTP loss or None) of one global batch, summed over the world: every tensor-parallel copy
    counts the same tokens, so the ratios are exact."""
    totals = torch.zeros(4, dtype=torch.float64, device=_device())
    for out in outputs:
        totals[:2] += out["lm loss"].double()
    tracker = MTPLossLoggingHelper.tracker
    if parallel_state.is_pipeline_last_stage() and "loss_values" in tracker:
        totals[2] += tracker["loss_values"].sum().double() / order.num_microbatches
        totals[3] += 1
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), (totals[2] / totals[3]).item() if totals[3] else None


def evaluate(model, dataset, order: DataOrder, iters: int, seq_length: int) -> dict:
    """LM, MTP and indexer loss (token means; None where the run has none) over `iters` global batches of
    `dataset`, without an optimizer step.

    The forward runs in training mode, because Megatron-Core's MTP records its loss only then
    (`process_mtp_loss(is_training=...)`); with an indexer loss it also runs with autograd recording,
    because the attention computes the indexer loss only then (no backward follows, so no gradient is
    made). DeepSeek-V4 has no dropout, and the buffers a training forward touches (the routers' token
    counts for the expert-bias update) are restored afterwards, so evaluating leaves training unchanged."""
    bare = model.module
    saved = {name: buffer.clone() for name, buffer in bare.named_buffers()}
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    IndexerLossTracker.reset()
    losses, mtp_losses, indexer_losses = [], [], []
    with torch.set_grad_enabled(bool(model.config.indexer_loss_coeff)):
        for i in range(iters):
            loss, mtp = _reduced_losses(_run_schedule(model, dataset, order, i, seq_length, True), order)
            losses.append(loss)
            mtp_losses.append(mtp)
            indexer_losses.append(indexer_loss(model, order.num_microbatches))
    with torch.no_grad():
        for name, buffer in bare.named_buffers():
            buffer.copy_(saved[name])
    return {
        "eval_loss": _mean(losses),
        "eval_mtp_loss": _mean(mtp_losses),
        "eval_indexer_loss": _mean(indexer_losses),
    }


def _mean(values: list[float | None]) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


def train_step(model, optimizer, scheduler, dataset, order: DataOrder, step: int, seq_length: int) -> dict:
    """Forward/backward over one global batch, optimizer and LR-scheduler step. Returns the step's metrics,
    identical on every rank: loss (token mean over the global batch), mtp_loss (None without MTP),
    indexer_loss (None without one), grad_norm, lr, tokens."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _run_schedule(model, dataset, order, step, seq_length, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    loss, mtp_loss = _reduced_losses(outputs, order)
    return {
        "loss": loss,
        "mtp_loss": mtp_loss,
        "indexer_loss": indexer_loss(model, order.num_microbatches),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": scheduler.get_lr(optimizer.param_groups[0]),
        "tokens": order.global_batch_size * seq_length,
    }
