"""DeepSeekV4HybridSelfAttention against transformers' DeepseekV4Attention, one rank, float32.

The reference is transformers' own attention module (with its compressors and
indexer), driven standalone: its position embeddings come from transformers'
DeepseekV4RotaryEmbedding and its mask is the sliding-window causal mask that
DeepseekV4Model builds (written below from the spec: key j visible to query i
when 0 <= i - j < sliding_window). Random weights are copied into ours through
the name map of tests/transformers_names.py; outputs and every parameter's
gradient are compared for sliding (0), CSA (4) and HCA (128) layers at the
compressor and window boundary lengths.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4Attention,
    DeepseekV4RotaryEmbedding,
)

import megatron_v4
from megatron_v4.specs import get_dsv4_attention_spec
from megatron_v4.config import DeepSeekV4TransformerConfig
from transformers_names import ATTENTION_NAMES

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM = 64, 4, 32, 16
Q_LORA, O_GROUPS, O_LORA, WINDOW = 32, 2, 16, 10
INDEX_HEADS, INDEX_HEAD_DIM, INDEX_TOPK = 16, 32, 4
ROPE_THETA, COMPRESS_ROPE_THETA, EPS = 10000.0, 160000.0, 1e-6
YARN = dict(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0)
BATCH, LONG = 2, 300  # 300 tokens: 2 HCA entries, 75 CSA entries (top-k is a real choice)

LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def boundary_lengths(ratio: int) -> list[int]:
    m = ratio or 4
    return sorted({1, m - 1, m, m + 1, WINDOW - 1, WINDOW, WINDOW + 1, LONG})


CASES = [(ratio, length) for ratio in (0, 4, 128) for length in boundary_lengths(ratio)]


@pytest.fixture(scope="module")
def layout():
    parallel_layout = megatron_v4.initialize()
    yield parallel_layout
    megatron_v4.destroy()


def reference_attention(ratio: int):
    config = DeepseekV4Config(
        vocab_size=32,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        q_lora_rank=Q_LORA,
        o_groups=O_GROUPS,
        o_lora_rank=O_LORA,
        sliding_window=WINDOW,
        layer_types=[LAYER_TYPE[ratio]],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        rope_theta=ROPE_THETA,
        compress_rope_theta=COMPRESS_ROPE_THETA,
        rope_parameters={"rope_type": "yarn", **YARN},
        rms_norm_eps=EPS,
        num_hash_layers=0,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    config._attn_implementation = "eager"
    attention = DeepseekV4Attention(config, layer_idx=0)
    generator = torch.Generator().manual_seed(1000 + ratio)
    with torch.no_grad():
        for name, param in attention.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif name in ("sinks",) or name.endswith("position_bias"):
                param.copy_(0.5 * noise)
            else:  # linears: unit-scale outputs
                param.copy_(noise / param.shape[1] ** 0.5)
    return attention, DeepseekV4RotaryEmbedding(config)


def our_attention(ratio: int, parallel_layout):
    config = DeepSeekV4TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        kv_channels=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        q_lora_rank=Q_LORA,
        o_groups=O_GROUPS,
        o_lora_rank=O_LORA,
        sliding_window=WINDOW,
        compress_ratios=[ratio],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        rope_theta=ROPE_THETA,
        compress_rope_theta=COMPRESS_ROPE_THETA,
        yarn_factor=YARN["factor"],
        yarn_original_max_position_embeddings=YARN["original_max_position_embeddings"],
        yarn_beta_fast=YARN["beta_fast"],
        yarn_beta_slow=YARN["beta_slow"],
        layernorm_epsilon=EPS,
        num_hash_layers=0,
        use_cpu_initialization=True,
        **parallel_layout.config_kwargs(),
    )
    return build_module(get_dsv4_attention_spec(use_te=False), config=config, layer_number=1)


def sliding_window_mask(length: int) -> torch.Tensor:
    """Additive [B, 1, S, S] mask: key j visible to query i iff 0 <= i - j < WINDOW."""
    distance = torch.arange(length).view(-1, 1) - torch.arange(length).view(1, -1)
    visible = (distance >= 0) & (distance < WINDOW)
    mask = torch.zeros(length, length).masked_fill(~visible, float("-inf"))
    return mask.expand(BATCH, 1, length, length)


@pytest.fixture(scope="module")
def attention_pairs(layout):
    pairs = {}
    for ratio in (0, 4, 128):
        reference, rotary = reference_attention(ratio)
        ours = our_attention(ratio, layout)
        ours_params = dict(ours.named_parameters())
        reference_params = dict(reference.named_parameters())
        assert set(ATTENTION_NAMES[name] for name in reference_params) == set(ours_params), (
            f"ratio {ratio}: parameter sets differ"
        )
        with torch.no_grad():
            for name, param in reference_params.items():
                ours_params[ATTENTION_NAMES[name]].copy_(param)
        pairs[ratio] = (reference, rotary, ours)
    return pairs


def relative_frobenius(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("ratio,length", CASES)
def test_attention_matches_transformers(attention_pairs, ratio, length):
    reference, rotary, ours = attention_pairs[ratio]
    reference.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(length)
    hidden = torch.randn(BATCH, length, HIDDEN, generator=generator)
    output_grad = torch.randn(BATCH, length, HIDDEN, generator=generator)

    reference_input = hidden.clone().requires_grad_()
    position_ids = torch.arange(length).unsqueeze(0).expand(BATCH, length)
    position_embeddings = {
        rope_type: rotary(reference_input, position_ids=position_ids, layer_type=rope_type)
        for rope_type in ("main", "compress")
    }
    expected, _ = reference(
        reference_input, position_embeddings, position_ids, sliding_window_mask(length)
    )
    (expected * output_grad).sum().backward()

    our_input = hidden.transpose(0, 1).clone().requires_grad_()
    actual, bias = ours(our_input)
    assert bias is None
    (actual * output_grad.transpose(0, 1)).sum().backward()

    actual = actual.transpose(0, 1)
    max_diff = (actual - expected).abs().max().item()
    assert max_diff <= 1e-5, f"ratio {ratio}, length {length}: max |diff| {max_diff:.3e}"
    input_error = relative_frobenius(our_input.grad.transpose(0, 1), reference_input.grad)
    assert input_error <= 1e-4, f"input gradient relative error {input_error:.3e}"

    ours_params = dict(ours.named_parameters())
    worst_grad_error = 0.0
    for name, param in reference.named_parameters():
        our_param = ours_params[ATTENTION_NAMES[name]]
        if param.grad is None:  # the indexer: its top-k choice passes no gradient
            assert our_param.grad is None, f"{ATTENTION_NAMES[name]} has a gradient, transformers' {name} has none"
            continue
        error = relative_frobenius(our_param.grad, param.grad)
        assert error <= 1e-4, f"gradient of {ATTENTION_NAMES[name]}: relative error {error:.3e}"
        worst_grad_error = max(worst_grad_error, error)
    print(
        f"ratio={ratio} len={length}: max|diff|={max_diff:.2e} (output max {expected.abs().max():.2f}), "
        f"input grad rel {input_error:.1e}, worst param grad rel {worst_grad_error:.1e}"
    )


def test_indexer_gets_no_gradient_but_attention_compressor_does(attention_pairs):
    """CSA at a long length: the attention's compressor is trained through the attention,
    the indexer's parameters are not (their choice is a discrete top-k)."""
    reference, rotary, ours = attention_pairs[4]
    ours.zero_grad(set_to_none=True)
    hidden = torch.randn(LONG, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7))
    ours(hidden)[0].square().sum().backward()
    grads = {name: param.grad for name, param in ours.named_parameters()}
    assert all(grads[name] is None for name in grads if name.startswith("indexer."))
    assert all(grads[name] is not None and grads[name].abs().sum() > 0 for name in grads if not name.startswith("indexer."))


# Tensor parallelism: heads, sinks, output groups and indexer heads split over 2 ranks.
# The first dim of these weights is split (column-parallel), linear_proj's second (row-parallel);
# everything else is replicated.
SPLIT_DIM = {
    "linear_q_up_proj.weight": 0,
    "attn_sink": 0,
    "linear_o_down_proj.weight": 0,
    "linear_proj.weight": 1,
    "indexer.linear_q_up_proj.weight": 0,
    "indexer.linear_weights_proj.weight": 0,
}
TP = 2


def _tensor_parallel_rank(full_weights: dict, hidden: torch.Tensor, output_grad: torch.Tensor):
    """On one of TP ranks: load this rank's shard of each weight, run forward and backward."""
    parallel_layout = megatron_v4.initialize(tp=TP)
    try:
        rank = torch.distributed.get_rank()
        results = {}
        for ratio, weights in full_weights.items():
            ours = our_attention(ratio, parallel_layout)
            with torch.no_grad():
                for name, param in ours.named_parameters():
                    full = weights[name]
                    if name in SPLIT_DIM:
                        full = full.chunk(TP, dim=SPLIT_DIM[name])[rank]
                    param.copy_(full)
            our_input = hidden.clone().requires_grad_()
            output, _ = ours(our_input)
            (output * output_grad).sum().backward()
            grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
            results[ratio] = (output.detach(), our_input.grad, grads)
        return results
    finally:
        megatron_v4.destroy()


def test_tensor_parallel_matches_transformers(attention_pairs):
    from megatron_v4.runtime.ranks import run_on_ranks

    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(BATCH, LONG, HIDDEN, generator=generator)
    output_grad = torch.randn(BATCH, LONG, HIDDEN, generator=generator)
    position_ids = torch.arange(LONG).unsqueeze(0).expand(BATCH, LONG)
    expected, full_weights = {}, {}
    for ratio, (reference, rotary, _) in attention_pairs.items():
        reference.zero_grad(set_to_none=True)
        reference_input = hidden.clone().requires_grad_()
        position_embeddings = {
            rope_type: rotary(reference_input, position_ids=position_ids, layer_type=rope_type)
            for rope_type in ("main", "compress")
        }
        output, _ = reference(reference_input, position_embeddings, position_ids, sliding_window_mask(LONG))
        (output * output_grad).sum().backward()
        grads = {ATTENTION_NAMES[n]: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        expected[ratio] = (output.detach(), reference_input.grad, grads)
        full_weights[ratio] = {ATTENTION_NAMES[n]: p.detach().clone() for n, p in reference.named_parameters()}

    per_rank = run_on_ranks(
        _tensor_parallel_rank, TP, full_weights, hidden.transpose(0, 1), output_grad.transpose(0, 1), timeout=240
    )
    for ratio, (expected_output, expected_input_grad, expected_grads) in expected.items():
        for rank_results in per_rank:  # the layer output and input gradient are complete on every rank
            output, input_grad, _ = rank_results[ratio]
            max_diff = (output.transpose(0, 1) - expected_output).abs().max().item()
            assert max_diff <= 1e-5, f"TP={TP}, ratio {ratio}: max |diff| {max_diff:.3e}"
            input_error = relative_frobenius(input_grad.transpose(0, 1), expected_input_grad)
            assert input_error <= 1e-4, f"TP={TP}, ratio {ratio}: input gradient error {input_error:.3e}"
        assert set(per_rank[0][ratio][2]) == set(expected_grads), f"TP={TP}, ratio {ratio}: gradient sets differ"
        for name, expected_grad in expected_grads.items():
            shards = [rank_results[ratio][2][name] for rank_results in per_rank]
            if name in SPLIT_DIM:
                shards = [torch.cat(shards, dim=SPLIT_DIM[name])]
            for grad in shards:
                error = relative_frobenius(grad, expected_grad)
                assert error <= 1e-4, f"TP={TP}, ratio {ratio}: gradient of {name}: relative error {error:.3e}"
