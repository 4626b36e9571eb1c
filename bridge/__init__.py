"""Hugging Face DeepSeek-V4 checkpoints <-> Megatron-Core `megatron_v4` models.

The names below load on first use (PEP 562), so that `python -m bridge --help` and argument mistakes
answer before PyTorch and Megatron-Core are imported.
"""

from megatron_v4.runtime.lazy import lazy_exports

_EXPORTS = {
    "AutoBridge": "bridge.auto_bridge",
    "DeepSeekV4HFConfig": "bridge.hf_config",
    "read_hf_config": "bridge.hf_config",
    "transformer_config": "bridge.hf_config",
    "transformer_config_kwargs": "bridge.hf_config",
    "OFFICIAL": "bridge.hf_naming",
    "TRANSFORMERS_MODULE": "bridge.hf_naming",
    "TRANSFORMERS_SAVED": "bridge.hf_naming",
    "detect_naming": "bridge.hf_naming",
    "hf_from_mcore_state_dict": "bridge.pipeline",
    "mcore_state_dict_from_hf": "bridge.pipeline",
    "make_tiny_checkpoint": "bridge.tiny",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
