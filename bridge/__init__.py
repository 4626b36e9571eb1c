"""Hugging Face DeepSeek-V4 checkpoints <-> Megatron-Core `megatron_v4` models."""

from bridge.auto_bridge import AutoBridge
from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config, transformer_config, transformer_config_kwargs
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE, TRANSFORMERS_SAVED, detect_naming
from bridge.pipeline import hf_from_mcore_state_dict, mcore_state_dict_from_hf
from bridge.tiny import make_tiny_checkpoint

__all__ = [
    "OFFICIAL",
    "TRANSFORMERS_MODULE",
    "TRANSFORMERS_SAVED",
    "AutoBridge",
    "DeepSeekV4HFConfig",
    "detect_naming",
    "hf_from_mcore_state_dict",
    "make_tiny_checkpoint",
    "mcore_state_dict_from_hf",
    "read_hf_config",
    "transformer_config",
    "transformer_config_kwargs",
]
