"""The packed-row check of tests/test_packed_sequences.py, at any parallel layout.

One packed row of documents goes through our model (logits by `forward_logits(..., cu_seqlens=...)`,
loss and gradients by a forward/backward, through Megatron-Core's pipeline schedule on PP > 1); the
reference is transformers' model run on every document alone: its logits, its loss summed over the
document's tokens, and the gradients of the sum of those losses.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from dsv4_parallel_ranks import _grad_errors, _load
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from test_model_parity import TinyConfig, hf_model, hf_tensors, hf_to_ours, our_config

import megatron_v4
from megatron_v4.model import DeepSeekV4Model, pipeline_micro_batch_size
from megatron_v4.packing import packed_seq_params
from megatron_v4.specs import get_dsv4_decoder_block_spec

# Window 8, ratios 4 and 128: lengths below and across each, a 1-token document in the middle.
LENGTHS = (37, 1, 130, 9, 3, 2)
PACKED = TinyConfig("packed", [4, 128, 0, 4], 1)
VOCAB = 128  # divisible by the tensor-parallel size


def packed_batch(vocab: int):
    """ids and labels [1, T] (labels: the next token of the row, across boundaries), cu_seqlens."""
    generator = torch.Generator().manual_seed(14)
    ids = torch.randint(0, vocab, (1, sum(LENGTHS)), generator=generator)
    cu = [0]
    for length in LENGTHS:
        cu.append(cu[-1] + length)
    return ids, torch.roll(ids, -1, dims=1), cu


def model_pair(tiny: TinyConfig, layout, **overrides):
    hf = hf_model(tiny, vocab=VOCAB).train()
    config = our_config(tiny, layout, vocab=VOCAB, pipeline_dtype=torch.float32, **overrides)
    ours = DeepSeekV4Model(
        config,
        decoder_spec=get_dsv4_decoder_block_spec(config, use_te=False),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).train()
    _load(ours, hf_to_ours(hf_tensors(hf), len(tiny.compress_ratios)))
    return hf, ours


def transformers_per_document(hf, ids, cu):
    """transformers on each document alone: logits [1, T, V], summed loss, gradients (contract names)."""
    hf.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for start, end in pairwise(cu):
        document = ids[:, start:end]
        out = hf(input_ids=document, labels=document if end - start > 1 else None)
        logits.append(out.logits.detach())
        if out.loss is not None:
            summed = out.loss * (end - start - 1)  # transformers averages over the n - 1 targets
            summed.backward()
            total += summed.item()
    grads = hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, hf.config.num_hidden_layers)
    return torch.cat(logits, dim=1), total, grads


def check_against_transformers(hf, ours, expert_copies: int = 1) -> dict:
    """Our packed row vs transformers per document. `expert_copies`: ranks of the expert-parallel
    group that pass the same row (their routed experts' gradients add up)."""
    ids, labels, cu = packed_batch(hf.config.vocab_size)
    hf_logits, hf_loss, expected = transformers_per_document(hf, ids, cu)
    for name in [n for n in expected if ".mlp.experts." in n]:
        expected[name] = expected[name] * expert_copies
    logits = megatron_v4.forward_logits(ours, ids, cu_seqlens=cu)

    ours.zero_grad(set_to_none=True)
    params = packed_seq_params(cu)

    def loss_func(per_token):
        loss = per_token.sum()  # unmasked: the model itself leaves each document's last token out
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(ids, labels=labels, packed_seq_params=params), loss_func

    config = ours.config
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ours],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=pipeline_micro_batch_size(config, 1),
        forward_only=False,
    )
    if config.sequence_parallel:
        reduce_sequence_parallel_grads(ours)
    result = {
        "logits_error": (logits - hf_logits).abs().max().item() / hf_logits.abs().max().item(),
        "grad_errors": _grad_errors(ours, expected),
    }
    if parallel_state.is_pipeline_last_stage():
        result["loss_error"] = abs(losses[0]["loss"].item() - hf_loss) / abs(hf_loss)
    return result


def reduce_sequence_parallel_grads(model) -> None:
    """What DDP and `finalize_model_grads` do for sequence parallelism: the parameters that act on this
    rank's slice of the sequence (norms, hyper-connections, routers) sum their gradients over the
    tensor-parallel ranks (those marked `average_gradients_across_tp_domain` average them), and the
    routed experts sum theirs over their data-parallel copies."""
    group = parallel_state.get_tensor_model_parallel_group()
    for param in model.parameters():
        if param.grad is None:
            continue
        if getattr(param, "average_gradients_across_tp_domain", False):
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG, group=group)
        elif getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=group)
        elif not getattr(param, "allreduce", True):  # routed experts: each copy saw its ranks' tokens
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_expert_data_parallel_group())


def assert_within(result: dict, tag: str) -> None:
    worst = max(result["grad_errors"], key=result["grad_errors"].get)
    print(
        f"[packed {tag}] logits rel {result['logits_error']:.2e}, loss rel {result.get('loss_error', 0):.2e}, "
        f"worst grad rel {result['grad_errors'][worst]:.2e} ({worst})"
    )
    assert result["logits_error"] <= 1e-5, (tag, result["logits_error"])
    assert result.get("loss_error", 0.0) <= 1e-5, (tag, result["loss_error"])
    assert result["grad_errors"][worst] <= 1e-4, (tag, worst, result["grad_errors"][worst])


def parallel_layouts() -> dict:
    """On each of two ranks: TP2 with sequence parallelism, EP2, PP2 in turn (one process group)."""
    torch.distributed.init_process_group("gloo")
    results = {}
    try:
        for name, sizes, expert_copies in (
            ("tp2-sp", {"tp": 2, "sp": True}, 1),
            ("ep2", {"ep": 2}, 2),
            ("pp2", {"pp": 2}, 1),
        ):
            layout = megatron_v4.initialize(**sizes)
            try:
                hf, ours = model_pair(PACKED, layout)
                results[name] = check_against_transformers(hf, ours, expert_copies)
            finally:
                megatron_v4.destroy()
    finally:
        torch.distributed.destroy_process_group()
    return results
