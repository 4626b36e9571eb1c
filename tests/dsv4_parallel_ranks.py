"""Rank functions for the DeepSeekV4Model parallel tests (tests/test_model_parallel.py).

Every rank builds the same random transformers model (and MTP reference),
copies its share of the tensors into its DeepSeekV4Model (its pipeline stage,
its tensor-parallel slices, its experts), runs forward and backward and
compares what it holds with transformers' numbers on the same data.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

import megatron_v4
from megatron_v4.model import DeepSeekV4Model, pipeline_micro_batch_size
from megatron_v4.specs import get_dsv4_decoder_block_spec
from layout_slicing import dsv4_global_name, shard, unshard
from test_model_parity import (
    CONFIGS,
    ReferenceMTP,
    TinyConfig,
    build_ours,
    hf_model,
    hf_tensors,
    hf_to_ours,
    mtp_to_ours,
    our_config,
    relative_frobenius,
)

MICRO_BATCH = 2


def _load(model: DeepSeekV4Model, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not name.endswith("_extra_state"):
                tensor.copy_(shard(name, tensor, full[dsv4_global_name(name, model)]))


def _grad_errors(model: DeepSeekV4Model, expected: dict[str, torch.Tensor], skip=lambda name: False) -> dict[str, float]:
    errors = {}
    for name, param in model.named_parameters():
        global_name = dsv4_global_name(name, model)
        if skip(global_name):
            continue
        if global_name not in expected:
            assert param.grad is None or not param.grad.any(), f"{global_name} has a gradient transformers lacks"
            continue
        assert param.grad is not None, f"{global_name} got no gradient"
        grad = unshard(name, param, param.grad)
        errors[global_name] = relative_frobenius(grad, expected[global_name])

    return errors


def pipeline_step(config_index: int, seq: int, num_microbatches: int) -> dict:
    layout = megatron_v4.initialize(pp=2)
    try:
        tiny = CONFIGS[config_index]
        num_layers = len(tiny.compress_ratios)
        hf = hf_model(tiny).train()
        config = our_config(tiny, layout, pipeline_dtype=torch.float32)
        model = DeepSeekV4Model(
            config,
            decoder_spec=get_dsv4_decoder_block_spec(config, use_te=False),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        ).train()
        _load(model, hf_to_ours(hf_tensors(hf), num_layers))

        generator = torch.Generator().manual_seed(seq)
        batches = [
            torch.randint(0, hf.config.vocab_size, (MICRO_BATCH, seq), generator=generator)
            for _ in range(num_microbatches)
        ]

        def loss_func(per_token):
            loss = per_token[:, :-1].mean()
            return loss, {"loss": loss.detach().clone()}

        def forward_step(data_iterator, stage):
            input_ids = next(data_iterator)
            return stage(input_ids, labels=torch.roll(input_ids, -1, dims=1)), loss_func

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=seq,
            micro_batch_size=pipeline_micro_batch_size(config, MICRO_BATCH),
            forward_only=False,
        )

        hf_losses = []
        for input_ids in batches:
            loss = hf(input_ids=input_ids, labels=input_ids).loss
            (loss / num_microbatches).backward()
            hf_losses.append(loss.detach())
        expected = hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, num_layers)

        result = {
            "grad_errors": _grad_errors(model, expected),
            "layers": [layer.layer_number for layer in model.decoder.layers],
        }
        if parallel_state.is_pipeline_last_stage():
            result["loss"] = torch.stack([x["loss"] for x in losses])
            result["hf_loss"] = torch.stack(hf_losses)
        return result
    finally:
        megatron_v4.destroy()


MTP_SCALING = 0.3


def _reference_step(hf, reference, input_ids: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
    """transformers + the spec-level MTP: logits, main loss and gradients (contract names) of
    main loss + MTP_SCALING * MTP loss on one batch."""
    hf.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    seq, vocab = input_ids.shape[1], hf.config.vocab_size
    captured = {}
    hook = hf.model.hc_head.register_forward_pre_hook(lambda module, args: captured.update(streams=args[0]))
    out = hf(input_ids=input_ids, labels=input_ids)
    hook.remove()
    mtp_logits = reference(hf, captured["streams"], input_ids)
    mtp_loss = torch.nn.functional.cross_entropy(
        mtp_logits[:, : seq - 2].reshape(-1, vocab), input_ids[:, 2:].reshape(-1)
    )
    (out.loss + MTP_SCALING * mtp_loss).backward()
    grads = {
        **hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, 3),
        **mtp_to_ours({n: p.grad for n, p in reference.named_parameters() if p.grad is not None}),
    }
    return out.logits.detach(), out.loss.item(), grads


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def tensor_or_expert_parallel_step(tp: int, ep: int, seq: int) -> dict:
    """One forward/backward of a 3-layer model with MTP at TP=tp, EP=ep on tp*ep... ranks.

    EP (data parallel over the EP ranks): every rank its own batch; routed experts see the
    tokens of all of them, so their gradients are the sum over the batches, the other
    parameters' those of the rank's batch. TP: the same batch on both ranks, eval mode
    (Megatron-Core's MoE needs sequence parallelism to train with TP > 1, and its allgather
    dispatcher then processes each TP rank's copy of the tokens: routed experts are checked
    by the EP run only).
    """
    layout = megatron_v4.initialize(tp=tp, ep=ep)
    try:
        tiny = TinyConfig("parallel", [0, 4, 128], 1)
        hf = hf_model(tiny, seed=9, mtp=1, vocab=128).train()
        reference = ReferenceMTP(hf).train()
        config = our_config(tiny, layout, vocab=128, mtp=1, mtp_loss_scaling_factor=MTP_SCALING)
        model = build_ours(config).train(tp == 1)
        _load(model, {**hf_to_ours(hf_tensors(hf), 3), **mtp_to_ours(hf_tensors(reference))})

        generator = torch.Generator().manual_seed(seq)
        batches = [torch.randint(0, 128, (2, seq), generator=generator) for _ in range(layout.dp)]
        input_ids = batches[parallel_state.get_data_parallel_rank()]
        labels = torch.roll(input_ids, -1, dims=1)
        loss_mask = torch.ones(2, seq)
        loss_mask[:, -1] = 0

        with torch.no_grad():
            logits = model(input_ids)
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
        per_token = model(input_ids, labels=labels, loss_mask=loss_mask)
        loss = (per_token * loss_mask).sum() / loss_mask.sum()
        loss.backward()

        steps = [_reference_step(hf, reference, batch) for batch in batches]
        hf_logits, hf_loss, expected = steps[parallel_state.get_data_parallel_rank()]
        for name in [n for n in expected if _is_routed_expert(n)]:
            expected[name] = sum(step[2][name] for step in steps)
        return {
            "logits_diff": (logits - hf_logits).abs().max().item(),
            "logits_scale": hf_logits.abs().max().item(),
            "loss": loss.item(),
            "hf_loss": hf_loss,
            "grad_errors": _grad_errors(model, expected, skip=_is_routed_expert if tp > 1 else lambda n: False),
        }
    finally:
        megatron_v4.destroy()
