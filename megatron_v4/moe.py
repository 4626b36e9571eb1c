"""The DeepSeek-V4 mixture of experts: Megatron-Core's MoELayer that can route by token id.

Everything is Megatron-Core's own forward (`MoELayer.forward`: CUDA-graph
partial capture, the inference dispatcher switch, the padding mask, MoE
recompute incl. its fp8/fp4 variant): token dispatchers, SequentialMLP /
TEGroupedMLP experts, the shared expert (added unweighted) and the clamped
SwiGLU (`activation_func_clamp_value`: gate clamped from above, up clamped on
both sides). The routed weight multiplies the expert's activation before
`linear_fc2`, which equals DeepSeek's w2(...) * weight because the experts
have no bias.

The one hook overridden is `route`: on the first `num_hash_layers` layers the
router is a `HashRouter`, whose experts are `tid2eid[token_id]` (DeepSeek-V4
report; `Gate.forward` of the official inference code), so it needs the ids
of the tokens it routes. `forward` takes them as `token_ids` ([seq, batch],
the tokens of `hidden_states`) and holds them for the duration of its call,
where `route` hands them to the router. They are an argument of every forward
rather than state set beforehand, so that pipeline schedules, which interleave
micro-batches, always route a micro-batch by its own ids. Megatron-Core's MoE
recompute re-runs `route` during the backward, after `forward` has returned;
on hash-routed layers the recompute therefore wraps this layer's whole call
(ids included) instead.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import maybe_skip_or_early_return_by_cudagraph


class DeepSeekV4MoELayer(MoELayer):
    """MoELayer whose router may be a `HashRouter` (then `forward` needs `token_ids`)."""

    _routing_token_ids: torch.Tensor | None = None

    @property
    def routes_by_token_id(self) -> bool:
        return getattr(self.router, "needs_token_ids", False)

    @maybe_skip_or_early_return_by_cudagraph("route")
    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.routes_by_token_id:
            return self.router(hidden_states, padding_mask, token_ids=self._routing_token_ids)
        return self.router(hidden_states, padding_mask)

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors=None,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ):
        """hidden_states [seq, batch, hidden], token_ids [seq, batch] -> (output, None), as MoELayer."""
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError(
                "training MoE with tensor parallelism needs sequence_parallel=True: without it the "
                "dispatcher gathers every TP rank's copy of the tokens and expert gradients count "
                "them tensor_model_parallel_size times"
            )
        if not self.routes_by_token_id:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if token_ids is None:
            raise ValueError(
                "this layer is hash-routed (tid2eid): pass the token ids of hidden_states as token_ids"
            )
        if self.moe_layer_recompute and self.training:
            if self.config.fp8 or self.config.fp4:
                raise ValueError(
                    "MoE recompute with fp8/fp4 is not supported on hash-routed layers; recompute the "
                    "whole layer instead (recompute_granularity='full')"
                )
            return tensor_parallel.checkpoint(
                self._forward_with_token_ids, False, hidden_states, token_ids, padding_mask
            )
        return self._forward_with_token_ids(hidden_states, token_ids, padding_mask, intermediate_tensors)

    def _forward_with_token_ids(self, hidden_states, token_ids, padding_mask, intermediate_tensors=None):
        """Megatron-Core's forward with `token_ids` held for `route` (its own recompute off: the caller
        already recomputes this whole call, ids included)."""
        recompute, self.moe_layer_recompute = self.moe_layer_recompute, False
        self._routing_token_ids = token_ids
        try:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        finally:
            self._routing_token_ids = None
            self.moe_layer_recompute = recompute
