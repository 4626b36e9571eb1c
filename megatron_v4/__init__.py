"""DeepSeek-V4 for released Megatron-Core."""

from megatron_v4.runtime import ParallelLayout, destroy, initialize, layout

__all__ = ["ParallelLayout", "destroy", "initialize", "layout"]
__version__ = "0.1.0"

from megatron_v4.config import DeepSeekV4TransformerConfig  # noqa: E402
from megatron_v4.evaluation import forward_logits  # noqa: E402
from megatron_v4.model import DeepSeekV4Model  # noqa: E402
from megatron_v4.specs import (  # noqa: E402
    get_dsv4_decoder_block_spec,
    get_dsv4_layer_spec,
    get_dsv4_mtp_block_spec,
)

__all__ += [
    "DeepSeekV4Model",
    "DeepSeekV4TransformerConfig",
    "forward_logits",
    "get_dsv4_decoder_block_spec",
    "get_dsv4_layer_spec",
    "get_dsv4_mtp_block_spec",
]
