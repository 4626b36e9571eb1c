"""DeepSeek-V4 expert routing.

Two routers, both scoring experts with s = sqrt(softplus(x W_gate^T)) in fp32
and weighting the chosen ones with s[chosen] / sum(s[chosen]) * routed_scaling_factor:

- Learned routing (every layer after the first `num_hash_layers`): the
  experts are the top-k of s + expert_bias, the bias being the aux-loss-free
  balancing term that affects selection only. This is exactly Megatron-Core's
  `TopKRouter` with `moe_router_score_function="sqrtsoftplus"`,
  `moe_router_enable_expert_bias=True` and `moe_router_topk_scaling_factor`,
  which `DeepSeekV4TransformerConfig` sets, so it is used as is.
- `HashRouter` (the first `num_hash_layers` layers): the experts are a fixed
  function of the token id, `tid2eid[token_id]`; only their weights are learned.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    ProcessGroupCollection,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import Router, TopKRouter

from megatron_v4.config import DeepSeekV4TransformerConfig

__all__ = ["HashRouter", "TopKRouter"]


class HashRouter(Router):
    """Routes each token to the experts `tid2eid[token_id]`.

    `tid2eid` [vocab_size, topk] (int64) is a frozen table that comes with the
    checkpoint: a persistent buffer, not a parameter, and never trained. There
    is no expert bias on these layers. `forward` needs the token ids of the
    tokens in `input`, in the same [seq, batch] layout (and the same
    sequence-parallel slice) as `input`.
    """

    needs_token_ids = True

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
    ) -> None:
        if is_mtp_layer:
            raise ValueError("MTP layers are not hash-routed; build them with TopKRouter")
        if not config.vocab_size:
            raise ValueError(
                "hash-routed layers need config.vocab_size (the tid2eid table has one row per token)"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.topk = config.moe_router_topk
        self.register_buffer("tid2eid", self._balanced_table(config), persistent=True)

    @staticmethod
    def _balanced_table(config: DeepSeekV4TransformerConfig) -> torch.Tensor:
        """The table of a randomly initialised model: token t goes to experts
        (t + j * (E // k)) mod E for j < k, which are k distinct experts (Megatron-Core's
        dropless dispatchers count k routed copies per token, so a row must not repeat an
        expert) and every expert gets the same share of the vocabulary. Checkpoints bring
        their own table."""
        experts, k = config.num_moe_experts, config.moe_router_topk
        token = torch.arange(config.vocab_size, dtype=torch.int64).unsqueeze(1)
        return (token + torch.arange(k, dtype=torch.int64) * (experts // k)) % experts

    def routing(self, logits: torch.Tensor, token_ids: torch.Tensor):
        """logits [tokens, experts], token_ids [tokens] -> (probs, routing_map), both [tokens, experts]."""
        return topk_routing_with_score_function(
            logits,
            self.topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.config.moe_router_score_function,
            precomputed_indices=self.tid2eid[token_ids],
        )

    def forward(
        self,
        input: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ):
        """input [seq, batch, hidden], token_ids [seq, batch] -> (probs, routing_map).

        `padding_mask` is Megatron-Core's router argument; it only masks load-balancing
        statistics, which hash-routed layers do not have, so it changes nothing here."""
        if token_ids is None:
            raise ValueError(
                "HashRouter needs the token ids: pass token_ids through the block and layer forward"
            )
        if token_ids.shape != input.shape[:-1]:
            raise ValueError(
                f"token_ids {tuple(token_ids.shape)} do not match the routed tokens "
                f"{tuple(input.shape[:-1])}; give them in [seq, batch] order (sequence-parallel slice)"
            )
        logits = self.gating(input).view(-1, self.config.num_moe_experts)
        return self.routing(logits, token_ids.reshape(-1))
