"""Training DeepSeek-V4 on Megatron-Core, as `examples/pretrain.py` drives it: the model of an
architecture for the current layout (`model_setup`), its optimizer (`optimizer`: AdamW or Muon), frozen
tensors (`freezing`), the data (`data`), one optimizer step and validation (`step`), metric files
(`metrics`) and `torch_dist` checkpoints with exact resume (`checkpointing`). Uses the bridge for
architectures and HF weights."""

from megatron_v4.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_v4.training.data import ByteTokenizer, DataOrder, HFTokenizer, VocabTokenizer, build_dataset, tokenise_to_indexed
from megatron_v4.training.model_setup import (
    build_model,
    checkpoint_mtp_layers,
    read_architecture,
    transformer_config,
)
from megatron_v4.training.optimizer import build_optimizer, optimizer_config
from megatron_v4.training.step import prepare_for_training, train_step

__all__ = [
    "ByteTokenizer",
    "DataOrder",
    "HFTokenizer",
    "VocabTokenizer",
    "build_dataset",
    "build_model",
    "build_optimizer",
    "checkpoint_mtp_layers",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_config",
    "prepare_for_training",
    "read_architecture",
    "save_checkpoint",
    "tokenise_to_indexed",
    "train_step",
    "transformer_config",
]
