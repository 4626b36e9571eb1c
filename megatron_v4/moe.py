"""The DeepSeek-V4 mixture of experts: Megatron-Core's MoELayer that can route by token id.

Everything but the routing call is Megatron-Core's: token dispatchers,
SequentialMLP / TEGroupedMLP experts, the shared expert (added unweighted)
and the clamped SwiGLU (`activation_func_clamp_value`: gate clamped from
above, up clamped on both sides). The routed weight multiplies the expert's
activation before `linear_fc2`, which equals DeepSeek's w2(...) * weight
because the experts have no bias.

The only change is the forward signature: `token_ids` ([seq, batch], the
tokens of `hidden_states`) travels with the activations so that hash-routed
layers can look their experts up. It is an explicit argument rather than
module state so that activation recomputation and pipeline schedules see the
right ids for every micro-batch.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer


class DeepSeekV4MoELayer(MoELayer):
    """MoELayer whose router may be a `HashRouter` (needs `token_ids`)."""

    @property
    def routes_by_token_id(self) -> bool:
        return getattr(self.router, "needs_token_ids", False)

    def _route(self, hidden_states: torch.Tensor, token_ids: torch.Tensor | None):
        if self.routes_by_token_id:
            return self.router(hidden_states, token_ids)
        return self.router(hidden_states)

    def _moe_forward(self, hidden_states: torch.Tensor, token_ids: torch.Tensor | None):
        shared_expert_output = self.shared_experts_compute(hidden_states)
        probs, routing_map = self._route(hidden_states, token_ids)
        hidden_states, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched_input, probs = self.dispatch(hidden_states, probs)
        expert_output, _ = self.routed_experts_compute(dispatched_input, probs)
        output = self.combine(expert_output)
        return self.postprocess(output, shared_expert_output)

    def forward(self, hidden_states: torch.Tensor, token_ids: torch.Tensor | None = None):
        """hidden_states [seq, batch, hidden], token_ids [seq, batch] -> (output, None)."""
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError(
                "training MoE with tensor parallelism needs sequence_parallel=True: without it the "
                "dispatcher gathers every TP rank's copy of the tokens and expert gradients count "
                "them tensor_model_parallel_size times"
            )
        if self.moe_layer_recompute and self.training:
            output = tensor_parallel.checkpoint(self._moe_forward, False, hidden_states, token_ids)
        else:
            output = self._moe_forward(hidden_states, token_ids)
        return output, None
