"""DeepSeek-V4 for released Megatron-Core.

The names below load on first use (PEP 562), so that `import megatron_v4` and the command-line tools'
`--help` do not pay for importing PyTorch and Megatron-Core up front.
"""

from megatron_v4.runtime.lazy import lazy_exports
from megatron_v4.runtime.quiet import quiet_known_warnings

quiet_known_warnings()

_EXPORTS = {
    "DeepSeekV4TransformerConfig": "megatron_v4.config",
    "DeepSeekV4Model": "megatron_v4.model",
    "pipeline_micro_batch_size": "megatron_v4.model",
    "get_dsv4_attention_spec": "megatron_v4.specs",
    "get_dsv4_decoder_block_spec": "megatron_v4.specs",
    "get_dsv4_layer_spec": "megatron_v4.specs",
    "get_dsv4_mtp_block_spec": "megatron_v4.specs",
    "ParallelLayout": "megatron_v4.runtime.parallel",
    "destroy": "megatron_v4.runtime.parallel",
    "initialize": "megatron_v4.runtime.parallel",
    "layout": "megatron_v4.runtime.parallel",
    "forward_logits": "megatron_v4.inference.evaluation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
