"""RMSNorm for the local (non-Transformer-Engine) specs, usable with sequence parallelism.

Megatron-Core's local `WrappedTorchNorm` refuses `sequence_parallel=True`. This
is the same `torch.nn.RMSNorm` (same parameter name, `weight`) that also marks
its weight the way Transformer Engine's norms do: under sequence parallelism a
norm applied to this rank's slice of the tokens gets a partial gradient, and
`finalize_model_grads` sums the weights marked `sequence_parallel` over the
tensor-parallel ranks. Norms that see the whole (gathered) sequence, inside
the attention, are built with a config whose `sequence_parallel` is False.
"""

from __future__ import annotations

import torch

from megatron_v4.config import DeepSeekV4TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built the Megatron-Core way: RMSNorm(config=, hidden_size=, eps=)."""

    def __init__(self, config: DeepSeekV4TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel

