"""Rank function for tests/test_bridge_convert.py: load an imported checkpoint at some TP/EP/PP, run it."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

import megatron_v4
from megatron_v4.model import pipeline_micro_batch_size
from bridge.convert import load_megatron_model


def outputs_at(layout: dict, mcore_dir: str, input_ids: torch.Tensor, config_overrides: dict) -> dict:
    """Full logits (TP/EP layouts) or per-token losses (pipeline layouts) of the loaded model."""
    megatron_v4.initialize(**layout)
    try:
        model = load_megatron_model(mcore_dir, pipeline_dtype=torch.float32, **config_overrides)
        if layout.get("pp", 1) == 1:
            with torch.no_grad():
                logits = model(input_ids)
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(logits) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(parts, logits, group=group)
            return {"logits": torch.cat(parts, dim=-1)}

        def forward_step(data_iterator, stage):
            ids = next(data_iterator)
            per_token = stage(ids, labels=torch.roll(ids, -1, dims=1))
            return per_token, lambda out: (out.sum(), {"per_token": out.detach().clone()})

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([input_ids]),
                model=[model],
                num_microbatches=1,
                seq_length=input_ids.shape[1],
                micro_batch_size=pipeline_micro_batch_size(model.config, input_ids.shape[0]),
                forward_only=True,
            )
        if parallel_state.is_pipeline_last_stage():
            return {"per_token": outputs[0]["per_token"]}
        return {}
    finally:
        megatron_v4.destroy()
