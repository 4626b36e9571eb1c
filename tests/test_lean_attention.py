"""What one CSA layer keeps for its backward at 8K tokens, one rank, float32.

The attention runs its queries in chunks of ATTENTION_CHUNK under activation checkpointing, so the
layer must not keep the k gathered entries of every query ([s, b, k, c]) nor every query's
probabilities ([s, b, H, window + k]). Every tensor autograd saves is counted (by storage, through
`torch.autograd.graph.saved_tensors_hooks`) and compared with a bound written here from the
dimensions: a fixed number of per-token vectors of the layer's own widths, plus one chunk's worth of
the k*c gather. The dimensions make k*c large against those widths, so the old per-query gather alone
(s*k*c floats) exceeds the bound many times over. Outputs and gradients are compared with the same
layer run as one chunk (the unchunked formula; transformers parity at chunk-crossing lengths is
tests/test_attention_parity.py).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

import megatron_v4
import megatron_v4.attention
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.specs import get_dsv4_attention_spec

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM = 32, 2, 64, 16
Q_LORA, O_GROUPS, O_LORA, WINDOW = 32, 2, 16, 16
INDEX_HEADS, INDEX_HEAD_DIM, INDEX_TOPK = 2, 16, 256
LENGTH = 8192
FLOAT = 4  # bytes


@pytest.fixture(scope="module")
def csa_layer():
    layout = megatron_v4.initialize()
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
        compress_ratios=[4],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        num_hash_layers=0,
        use_cpu_initialization=True,
        **layout.config_kwargs(),
    )
    torch.manual_seed(0)
    layer = build_module(get_dsv4_attention_spec(use_te=False), config=config, layer_number=1)
    with torch.no_grad():
        layer.attn_sink.normal_()
    yield layer
    megatron_v4.destroy()


def forward_backward(layer, hidden, output_grad, saved_bytes: dict | None = None):
    """Output, input gradient and parameter gradients; `saved_bytes` collects the storages autograd keeps."""
    layer.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = layer(hidden)
    if saved_bytes is not None:
        saved_bytes["total"] = sum(storages.values())
    (output * output_grad).sum().backward()
    return (
        output.detach(),
        hidden.grad,
        {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None},
    )


def test_csa_layer_keeps_chunk_sized_activations_and_same_numbers(csa_layer, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(LENGTH, 1, HIDDEN, generator=generator)
    output_grad = torch.randn(LENGTH, 1, HIDDEN, generator=generator)

    saved = {}
    chunked = forward_backward(csa_layer, hidden, output_grad, saved)
    chunk = megatron_v4.attention.ATTENTION_CHUNK
    # Per token: the input and its norms, q_compressed, the queries before/after norm and rope, kv,
    # the compressor's float32 values and gates (2 x 2c), the output before/after inverse rope and the
    # grouped projection: 16 vectors of the widest per-token width is generous.
    widest = max(HIDDEN, HEADS * HEAD_DIM, 2 * HEAD_DIM, Q_LORA)
    bound = LENGTH * 16 * widest * FLOAT + chunk * INDEX_TOPK * HEAD_DIM * FLOAT
    old_gather = LENGTH * INDEX_TOPK * HEAD_DIM * FLOAT
    print(
        f"saved {saved['total'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, old gather alone {old_gather / 2**20:.1f} MiB"
    )
    assert saved["total"] <= bound, f"saved {saved['total']} bytes > bound {bound}"
    assert old_gather >= 4 * bound

    monkeypatch.setattr(megatron_v4.attention, "ATTENTION_CHUNK", LENGTH)
    whole = forward_backward(csa_layer, hidden, output_grad)
    for name, ours, reference in [("output", chunked[0], whole[0]), ("input gradient", chunked[1], whole[1])] + [
        (name, chunked[2][name], whole[2][name]) for name in whole[2]
    ]:
        error = ((ours - reference).norm() / reference.norm()).item()
        assert error <= 1e-5, f"{name}: relative error {error:.2e} between chunked and one-chunk attention"
    assert chunked[2].keys() == whole[2].keys()


def test_queries_that_end_a_longer_key_sequence(csa_layer):
    """`_attend` for the last s_q queries against all s_k keys (a context-parallel rank's queries
    against the prefix) gives those rows of the whole sequence's attention, teacher included."""
    captured = {}
    attend = csa_layer._attend

    def capture(*args):
        captured["args"] = args
        return attend(*args)

    csa_layer._attend = capture
    try:
        with torch.no_grad():
            csa_layer(torch.randn(1100, 1, HIDDEN, generator=torch.Generator().manual_seed(2)))
    finally:
        del csa_layer._attend
    query, key_value, entries, picks, positions, _ = captured["args"]
    with torch.no_grad():
        whole_output, whole_teacher = csa_layer._attend(query, key_value, entries, picks, positions, True)
    for query_len in (1, 300, 700):
        rows = slice(-query_len, None)
        with torch.no_grad():
            output, teacher = csa_layer._attend(query[rows], key_value, entries, picks[rows], positions[rows], True)
        torch.testing.assert_close(output, whole_output[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(teacher, whole_teacher[rows], rtol=1e-5, atol=1e-7)
