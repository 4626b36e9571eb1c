"""DeepSeek-V4 for released Megatron-Core.

The names below load on first use (PEP 562), so that `import megatron_v4` and the command-line tools'
`--help` do not pay for importing PyTorch and Megatron-Core up front.
"""

import importlib

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_v4' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
