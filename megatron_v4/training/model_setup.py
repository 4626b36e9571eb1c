"""The model a training run builds: its config for the current parallel layout, this rank's pipeline
stage wrapped for mixed precision and in Megatron-Core's `DistributedDataParallel`, its optimizer, and
weights from a `torch_dist` checkpoint (a `bridge import` output or a training checkpoint)."""

from __future__ import annotations

import json
import os

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from bridge import read_hf_config, transformer_config_kwargs
from bridge.convert import RECORD_DIR
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.model import DeepSeekV4Model
from megatron_v4.runtime import layout


def transformer_config(arch, dtype: torch.dtype, mtp_num_layers: int | None = None, **overrides):
    """`DeepSeekV4TransformerConfig` of architecture `arch` (a `bridge.DeepSeekV4HFConfig`) for this layout."""
    kwargs = transformer_config_kwargs(arch, mtp_num_layers=mtp_num_layers)
    kwargs.update(layout().config_kwargs())
    kwargs.update(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return DeepSeekV4TransformerConfig(**kwargs)


def bare_model(config: DeepSeekV4TransformerConfig) -> DeepSeekV4Model:
    """This rank's stage of `DeepSeekV4Model`, on the GPU when there is one."""
    bare = DeepSeekV4Model(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        bare.cuda(torch.cuda.current_device())
    return bare


def build_model(config: DeepSeekV4TransformerConfig, use_distributed_optimizer: bool = True, bare=None):
    """This rank's stage of `DeepSeekV4Model` (`bare`, or a new one), in bf16 if the config says so, inside
    Megatron-Core's DDP (gradients reduce-scattered for the distributed optimizer, else all-reduced).

    Returns (ddp_model, bare_model): the bare model is what checkpoints and weight loading see.
    """
    bare = bare_model(config) if bare is None else bare
    module = Float16Module(config, bare) if config.bf16 else bare
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, module), bare


def load_model_weights(bare: DeepSeekV4Model, checkpoint_dir: str) -> None:
    """Model weights only, from a `torch_dist` checkpoint (`bridge import` or one of ours), at any layout."""
    sharded = bare.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": sharded}, checkpoint_dir)
    bare.load_state_dict(loaded["model"])


def read_architecture(checkpoint_dir: str):
    """The architecture a checkpoint records in `dsv4_bridge/config.json`."""
    path = os.path.join(checkpoint_dir, RECORD_DIR, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: --load needs a checkpoint written by `python -m bridge import` or by pretrain.py"
        )
    return read_hf_config(path)


def checkpoint_mtp_layers(checkpoint_dir: str) -> int | None:
    """MTP layers of the model a checkpoint holds (None: the architecture's own count)."""
    record = os.path.join(checkpoint_dir, RECORD_DIR, "source.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f).get("mtp_num_layers")
    return None
