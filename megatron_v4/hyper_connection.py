"""Manifold-constrained hyper-connections (mHC), the residual of DeepSeek-V4.

The residual stream is widened to `hc_mult` (n) parallel streams X of shape
[seq, batch, n, hidden]. Around every sublayer (attention, MoE) a
`HyperConnection` reads all streams and produces three mixings:

- pre  [n]:    how the streams collapse into the sublayer's input,
- post [n]:    how the sublayer's output is spread back over the streams,
- comb [n, n]: how the old streams are carried over; projected onto the
  doubly-stochastic matrices with Sinkhorn-Knopp so the residual cannot grow.

New streams: X'_k = post_k * out + sum_j comb[j, k] * X_j, i.e. comb^T X
(comb is not symmetric; using comb X is a known porting bug).

`HyperHead` collapses the streams once more, after the last layer, with its
own `pre`-style weights.

The mixings are computed in float32 whatever the activation dtype (the
official parameters are float32 too).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_v4.config import DeepSeekV4TransformerConfig


def _flat_rms_projection(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(x @ fn^T) * rsqrt(mean(x^2) + eps) with x the streams flattened stream-major, in fp32."""
    flat = streams.flatten(-2).float()
    inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return torch.nn.functional.linear(flat * inv_rms, fn.float())


def _sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Softmax over the last axis (+eps), then alternate column / row normalisation.

    The first normalisation is over columns (the first of the two matrix axes),
    then (iters - 1) rounds of rows then columns, each with +eps in the divisor,
    as in the reference implementation.
    """
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j * X_j in fp32, returned in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams.float()).sum(dim=-2).to(streams.dtype)


class HyperConnection(MegatronModule):
    """The mHC mixing around one sublayer.

    Parameters (float32): `fn` [(2+n)n, n*hidden], `base` [(2+n)n], `scale` [3]
    (pre, post, comb). Replicated on every tensor-parallel rank; under sequence
    parallelism each rank sees a slice of the tokens, so their gradients are
    partial sums (marked `sequence_parallel` for Megatron's grad all-reduce).
    """

    def __init__(self, config: DeepSeekV4TransformerConfig):
        super().__init__(config)
        n, hidden = config.hc_mult, config.hidden_size
        self.hc_mult = n
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.norm_eps = config.layernorm_epsilon
        mixes = (2 + n) * n
        self.fn = torch.nn.Parameter(torch.empty(mixes, n * hidden, dtype=torch.float32))
        self.base = torch.nn.Parameter(torch.zeros(mixes, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
        if config.perform_initialization:
            config.init_method(self.fn)
        for param in (self.fn, self.base, self.scale):
            param.sequence_parallel = config.sequence_parallel

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [..., n, hidden] -> (sublayer input [..., hidden], post [..., n], comb [..., n, n]).

        `post` and `comb` are float32; apply them with `expand`.
        """
        n = self.hc_mult
        mixes = _flat_rms_projection(streams, self.fn, self.norm_eps)
        pre_m, post_m, comb_m = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)

        pre = torch.sigmoid(pre_m * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_m * post_s + post_b)
        comb_logits = (comb_m * comb_s + comb_b).unflatten(-1, (n, n))
        comb = _sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)
        return _collapse(streams, pre), post, comb

    @staticmethod
    def expand(
        output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """New streams: post (x) output + comb^T streams, in the streams' dtype."""
        dtype = streams.dtype
        spread = post.to(dtype).unsqueeze(-1) * output.unsqueeze(-2)
        carried = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return spread + carried


class HyperHead(MegatronModule):
    """Final collapse of the n streams into one hidden vector per token.

    Parameters (float32): `fn` [n, n*hidden], `base` [n], `scale` [1].
    """

    def __init__(self, config: DeepSeekV4TransformerConfig):
        super().__init__(config)
        n, hidden = config.hc_mult, config.hidden_size
        self.hc_eps = config.hc_eps
        self.norm_eps = config.layernorm_epsilon
        self.fn = torch.nn.Parameter(torch.empty(n, n * hidden, dtype=torch.float32))
        self.base = torch.nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float32))
        if config.perform_initialization:
            config.init_method(self.fn)
        for param in (self.fn, self.base, self.scale):
            param.sequence_parallel = config.sequence_parallel

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [..., n, hidden] -> [..., hidden]."""
        mixes = _flat_rms_projection(streams, self.fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.hc_eps
        return _collapse(streams, pre)
