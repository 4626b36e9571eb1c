"""DeepSeek-V4 for released Megatron-Core."""

from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.inference import forward_logits
from megatron_v4.model import DeepSeekV4Model, pipeline_micro_batch_size
from megatron_v4.runtime import ParallelLayout, destroy, initialize, layout
from megatron_v4.specs import (
    get_dsv4_decoder_block_spec,
    get_dsv4_layer_spec,
    get_dsv4_mtp_block_spec,
)

__all__ = [
    "DeepSeekV4Model",
    "DeepSeekV4TransformerConfig",
    "ParallelLayout",
    "destroy",
    "forward_logits",
    "get_dsv4_decoder_block_spec",
    "get_dsv4_layer_spec",
    "get_dsv4_mtp_block_spec",
    "initialize",
    "layout",
    "pipeline_micro_batch_size",
]
__version__ = "0.1.0"
