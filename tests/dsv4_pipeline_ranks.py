"""Rank function for the DeepSeekV4Model pipeline test (tests/test_model_pipeline.py).

Every rank builds the same random transformers model, copies its pipeline
stage's tensors into a DeepSeekV4Model stage, runs Megatron-Core's 1F1B
schedule on a few micro-batches and compares the loss (last stage) and its
stage's gradients with transformers' on the same micro-batches.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

import megatron_v4
from megatron_v4.model import DeepSeekV4Model
from megatron_v4.specs import get_dsv4_decoder_block_spec
from test_model_parity import (
    CONFIGS,
    hf_model,
    hf_tensors,
    hf_to_ours,
    our_config,
    relative_frobenius,
)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
MICRO_BATCH = 2


def _global_name(name: str, model: DeepSeekV4Model) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    return f"decoder.layers.{int(match.group(1)) + model.decoder.layer_offset}.{match.group(2)}"


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
        full = hf_to_ours(hf_tensors(hf), num_layers)
        with torch.no_grad():
            for name, tensor in model.state_dict(keep_vars=True).items():
                if not name.endswith("_extra_state"):
                    tensor.copy_(full[_global_name(name, model)])

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
            micro_batch_size=MICRO_BATCH * config.hc_mult,
            forward_only=False,
        )

        hf_losses = []
        for input_ids in batches:
            loss = hf(input_ids=input_ids, labels=input_ids).loss
            (loss / num_microbatches).backward()
            hf_losses.append(loss.detach())
        expected = hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, num_layers)

        grad_errors = {}
        for name, param in model.named_parameters():
            global_name = _global_name(name, model)
            if global_name not in expected:
                assert param.grad is None or not param.grad.any(), f"{global_name} has a gradient transformers lacks"
                continue
            assert param.grad is not None, f"{global_name} got no gradient"
            grad_errors[global_name] = relative_frobenius(param.grad, expected[global_name])
        result = {"grad_errors": grad_errors, "layers": [layer.layer_number for layer in model.decoder.layers]}
        if parallel_state.is_pipeline_last_stage():
            result["loss"] = torch.stack([x["loss"] for x in losses])
            result["hf_loss"] = torch.stack(hf_losses)
        return result
    finally:
        megatron_v4.destroy()
