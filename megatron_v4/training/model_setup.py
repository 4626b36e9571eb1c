"""The model a training run builds: its config for the current parallel layout, this rank's pipeline
stage wrapped for mixed precision and in Megatron-Core's `DistributedDataParallel`, its optimizer, and
weights from a `torch_dist` checkpoint (a `bridge import` output or a training checkpoint)."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from bridge.checkpoint_dirs import RECORD_DIR
from bridge.convert import SourceRecord
from bridge.mcore_naming import detect_expert_form
from bridge.hf_config import read_hf_config
from bridge.hf_config import transformer_config as transformer_config  # training's config: the bridge's one mapping
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.model import DeepSeekV4Model


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


def read_architecture(checkpoint_dir: str):
    """The architecture a checkpoint records in `dsv4_bridge/config.json`."""
    path = os.path.join(checkpoint_dir, RECORD_DIR, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: --load needs a checkpoint written by `python -m bridge import` or by pretrain.py"
        )
    return read_hf_config(path)


def checkpoint_mtp_layers(checkpoint_dir: str) -> int:
    """MTP layers of the model a checkpoint holds."""
    return SourceRecord.load(checkpoint_dir).mtp_num_layers


def export_record(model: DeepSeekV4Model, base: SourceRecord) -> SourceRecord:
    """The record a checkpoint of `model` carries so that `bridge export` can write it back to Hugging
    Face: `base` (the record of the weights it started from) for this model's dtype, MTP depth and
    expert form."""
    config = model.config
    return base.for_model(config.params_dtype, config.mtp_num_layers or 0, detect_expert_form(model.state_dict()))
