"""DeepSeek-V4 for released Megatron-Core."""

from megatron_v4.runtime import ParallelLayout, destroy, initialize, layout

__all__ = ["ParallelLayout", "destroy", "initialize", "layout"]
__version__ = "0.1.0"
