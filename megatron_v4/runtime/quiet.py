"""Library messages a user cannot act on, filtered where they are known to be harmless.

Each entry says why it is harmless. `MEGATRON_V4_VERBOSE=1` (the tools' `--verbose`) keeps them all.
Applied when `megatron_v4` is imported (before Megatron-Core is), and by the tools before they import
the libraries.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "MEGATRON_V4_VERBOSE"

HARMLESS_WARNINGS = (
    # Megatron-Core's optimizer, clip-grad and FSDP modules fall back to torch implementations of the
    # fused multi-tensor kernels when neither Transformer Engine nor apex is installed (every CPU
    # machine); the fallbacks compute the same values.
    r"Transformer Engine and Apex are not installed",
    # Megatron-Core's local spec uses torch's norms without apex; ours are this package's own anyway.
    r"Apex is not installed\. Falling back to Torch Norm",
    # Megatron-Core's HyperCommGrid logs through the standard logging module without absl.
    r"absl\.logging is not installed",
    # transformers notes that DeepSeek-V4's YaRN dict carries keys its validator does not list.
    r".*RoPE scaling.*",
    # Megatron-Core 0.19 calls torch.distributed's renamed collectives; same operations.
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    # Megatron-Core's TransformerConfig warns about its own default cuda_graph_scope.
    r"full scope is deprecated",
    # Megatron-Core's optimizer probes `.grad` on fp32 main parameters that are views of the model's.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    # Importing megatron.core.models announces an experimental model family we do not use.
    r"MimoModelConfig is experimental",
    # Megatron-Core's own modules (its MoE and shared-expert internals) constructed the 0.19 way.
    r"Warning. tp_group is None, using default tp group",
    r"MLP requires ffn_hidden_size, but it was not provided",
    r"The following imports from `dynamic_context\.py` will be removed",
    # torch.distributed.checkpoint, as Megatron-Core's dist_checkpointing drives it: its ShardedTensor
    # planner path, its renamed load() arguments, and a one-process load without a process group.
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"The argument order of load has been changed",
    r"torch\.distributed is disabled, unavailable or uninitialized",
    # Megatron-Core's config checks name the rank in messages; without a process group (a config
    # built before `initialize`) it says it assumes rank 0, which is right for one process.
    r"Could not determine rank from torch\.distributed",
)

HARMLESS_LOGGERS = {
    # torch notes that the CUDA build finds no CUDA runtime on a CPU machine.
    "torch.utils.cpp_extension": logging.ERROR,
}

HARMLESS_LOG_MESSAGES = {
    # Mock data is generated, not read: there is nothing to cache.
    "megatron.core.datasets.gpt_dataset": r"Unable to save MockGPTDataset indexes because path_to_cache is None",
    # Megatron-Core suggests an optimisation for callers that pre-compute the parameter layout; its own
    # computation gives the same layout.
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    # transformers checks YaRN's factor against max_position_embeddings / original_max_position_embeddings
    # (equal in the released configs, not in small test ones); it uses the explicit factor, as
    # DeepSeek-V4's official inference code does.
    "transformers.modeling_rope_utils": r"The explicitly set RoPE scaling factor",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_known_warnings() -> None:
    """Filter the messages above (nothing when MEGATRON_V4_VERBOSE is set)."""
    if verbose():
        return
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)  # every category: some are DeprecationWarnings
    for name, level in HARMLESS_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, pattern in HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
