"""The lightning indexer's distillation loss and the dense CSA phase (megatron_v4.indexer_loss).

The reference below is written from the formulas (DeepSeek-V3.2 report, section
2.1): a CSA layer's main attention over [s, s] window masks and all [s, n]
compressed entries (its probabilities with the real denominator: window keys +
attended entries + sink), the indexer score I over every entry and its top-k,
the teacher (head-summed, L1-normalised) and KL(teacher || softmax(I)) summed
over the queries that see an entry, over seq * batch, times the coefficient.
It reuses only the layer's projections, norms, rotary tables and compressors
(checked against transformers by test_attention_parity.py).

Float32, one rank, except `test_layouts_train_the_indexer_like_one_rank`
(tests/dsv4_layout_ranks.py: TP2+SP, EP2, PP2, PP2+VPP2 and TP2+SP+PP2 against one rank,
plus full activation recompute, over 3 optimizer steps).
"""

from __future__ import annotations

import re

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

import dsv4_layout_ranks as layout_ranks
import megatron_v4
from megatron_v4.specs import get_dsv4_attention_spec
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.indexer_loss import IndexerLossTracker
from megatron_v4.rope import apply_rotary
from megatron_v4.runtime.ranks import run_on_ranks
from test_model_layouts import TOLERANCE, _check_logits, _check_training

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM, WINDOW = 32, 4, 16, 8, 8
INDEX_HEADS, INDEX_HEAD_DIM, INDEX_TOPK = 16, 16, 4
BATCH, EPS, M = 2, 1e-6, 4
# Entries: 1, 2 (the window's edge), 9 (a real top-k choice), 32 (two query blocks of 128 in the loss).
LENGTHS = [5, 9, 37, 131]


@pytest.fixture(scope="module")
def layout():
    parallel_layout = megatron_v4.initialize()
    yield parallel_layout
    megatron_v4.destroy()


def csa_layer(layout, seed: int = 0, **overrides):
    config = DeepSeekV4TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        kv_channels=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=8,
        sliding_window=WINDOW,
        compress_ratios=[M],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        yarn_factor=4.0,
        yarn_original_max_position_embeddings=64,
        layernorm_epsilon=EPS,
        num_hash_layers=0,
        use_cpu_initialization=True,
        **layout.config_kwargs(),
        **overrides,
    )
    layer = build_module(get_dsv4_attention_spec(use_te=False), config=config, layer_number=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 1 or name.endswith("ape"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)
    return layer


def modes(coeff: float = 1.0):
    """Config overrides of the indexer warm-up (dense) and the sparse phase."""
    return {
        "dense": dict(indexer_loss_coeff=coeff, csa_dense_attention=True),
        "sparse": dict(indexer_loss_coeff=coeff, indexer_use_sparse_loss=True),
    }


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)


def reference_indexer_scores(layer, x):
    """I [s, b, n] over every entry, -inf where not visible, and the visibility mask."""
    seq, batch, _ = x.shape
    indexer = layer.indexer
    positions = torch.arange(seq).view(seq, 1).expand(seq, batch)
    cos, sin = indexer.rotary(positions)
    q_compressed = layer.q_layernorm(layer.linear_q_down_proj(x)[0])
    queries = indexer.linear_q_up_proj(q_compressed)[0].view(seq, batch, INDEX_HEADS, INDEX_HEAD_DIM)
    queries = apply_rotary(queries, cos.unsqueeze(2), sin.unsqueeze(2))
    weights = indexer.linear_weights_proj(x)[0] * INDEX_HEAD_DIM**-0.5 * INDEX_HEADS**-0.5
    keys = indexer.compressor(x)
    scores = torch.einsum("sbh,sbhn->sbn", weights, torch.einsum("sbhd,nbd->sbhn", queries, keys).relu())
    visible = torch.arange(keys.shape[0]) < (torch.arange(seq).view(seq, 1, 1) + 1) // M
    return scores.masked_fill(~visible, float("-inf")), visible.expand_as(scores)


def reference_attention(layer, x, attended):
    """The layer's output [s, b, D] and its entry probabilities [s, b, H, n] when query t attends
    its window and the entries `attended` [s, b, n] marks, with the sink in the denominator."""
    seq, batch, _ = x.shape
    positions = torch.arange(seq).view(seq, 1).expand(seq, batch)
    cos, sin = layer.rotary(positions)
    head_cos, head_sin = cos.unsqueeze(2), sin.unsqueeze(2)
    query = layer.linear_q_up_proj(layer.q_layernorm(layer.linear_q_down_proj(x)[0]))[0]
    query = apply_rotary(rms(query.view(seq, batch, HEADS, HEAD_DIM)), head_cos, head_sin)
    kv = apply_rotary(layer.kv_layernorm(layer.linear_kv(x)[0]), cos, sin)
    entries = layer.compressor(x)
    distance = torch.arange(seq).view(seq, 1) - torch.arange(seq).view(1, seq)
    in_window = ((distance >= 0) & (distance < WINDOW)).view(seq, 1, 1, seq)
    window_logits = torch.einsum("sbhc,tbc->sbht", query, kv) / HEAD_DIM**0.5
    entry_logits = torch.einsum("sbhc,nbc->sbhn", query, entries) / HEAD_DIM**0.5
    logits = torch.cat(
        (
            window_logits.masked_fill(~in_window, float("-inf")),
            entry_logits.masked_fill(~attended.unsqueeze(2), float("-inf")),
            layer.attn_sink.view(1, 1, HEADS, 1).expand(seq, batch, HEADS, 1),
        ),
        dim=-1,
    )
    probabilities = logits.softmax(dim=-1)
    window_p, entry_p = probabilities[..., :seq], probabilities[..., seq:-1]
    heads = torch.einsum("sbht,tbc->sbhc", window_p, kv) + torch.einsum("sbhn,nbc->sbhc", entry_p, entries)
    output, _ = layer._project_output(heads, head_cos, head_sin)
    return output, entry_p


def reference_candidates(layer, x, sparse: bool):
    """Each query's loss candidates [s, b, n]: the visible entries, or the visible top-k of I."""
    with torch.no_grad():
        scores, visible = reference_indexer_scores(layer, x)
    if not sparse or scores.shape[-1] == 0:
        return visible
    top = scores.topk(min(INDEX_TOPK, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(visible).scatter(-1, top, True) & visible


def reference_loss(layer, x, sparse: bool, coeff: float):
    """The loss from its definition, differentiable in the indexer's parameters only."""
    x = x.detach()
    candidates = reference_candidates(layer, x, sparse)
    with torch.no_grad():
        _, entry_p = reference_attention(layer, x, candidates)
        teacher = entry_p.sum(dim=2)
        teacher = teacher / teacher.sum(-1, keepdim=True)
    scores, _ = reference_indexer_scores(layer, x)
    total = 0.0
    for t in range(x.shape[0]):
        for b in range(x.shape[1]):
            chosen = candidates[t, b]
            if chosen.any():
                p, log_q = teacher[t, b][chosen], scores[t, b][chosen].log_softmax(-1)
                total = total + (p * (p.log() - log_q)).sum()
    return coeff * total / (x.shape[0] * x.shape[1])


def indexer_grads(layer) -> dict[str, torch.Tensor | None]:
    return {name: param.grad for name, param in layer.named_parameters() if name.startswith("indexer.")}


def run_with_indexer_loss(layer, x):
    """Our loss (from the tracker) and gradients, with the output's own gradient zero."""
    IndexerLossTracker.reset()
    layer.train()
    layer.zero_grad(set_to_none=True)
    output, _ = layer(x)
    output.backward(torch.zeros_like(output))
    loss = IndexerLossTracker.sums.get(1, torch.tensor(0.0))
    IndexerLossTracker.reset()
    return output.detach(), loss


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_loss_and_indexer_gradients_match_the_formula(layout, mode, length):
    coeff = 0.7
    layer = csa_layer(layout, **modes(coeff)[mode])
    x = torch.randn(length, BATCH, HIDDEN, generator=torch.Generator().manual_seed(length))
    output, loss = run_with_indexer_loss(layer, x.clone().requires_grad_())

    reference = csa_layer(layout, **modes(coeff)[mode])  # the same weights
    expected = reference_loss(reference, x, sparse=mode == "sparse", coeff=coeff)
    if length >= 2 * M:  # with one entry every valid query has one candidate: the KL is 0
        expected.backward()
        assert expected > 1e-3
    assert abs(loss - expected) <= 1e-5 * max(abs(expected), 1e-3), (loss, expected)

    with torch.no_grad():
        attended = reference_candidates(reference, x, sparse=mode == "sparse")
        expected_output, _ = reference_attention(reference, x, attended)
    assert (output - expected_output).abs().max() <= 1e-5 * expected_output.abs().max()

    worst = 0.0
    for name, grad in indexer_grads(layer).items():
        expected_grad = indexer_grads(reference)[name]
        if expected_grad is None:
            assert grad is None or grad.abs().max() == 0, name
            continue
        error = ((grad - expected_grad).norm() / expected_grad.norm()).item()
        assert error <= 1e-4, (name, error)
        worst = max(worst, error)
    print(f"{mode} len={length}: loss {float(loss):.6f} (reference {expected.item():.6f}), worst grad rel {worst:.1e}")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_main_model_gradients_do_not_see_the_indexer_loss(layout, mode):
    """The LM backward is bit-identical with the coefficient at 0 and 1; without the loss the
    indexer gets no gradient (its top-k choice passes none)."""
    x = torch.randn(37, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7))
    output_grad = torch.randn(37, BATCH, HIDDEN, generator=torch.Generator().manual_seed(8))
    grads = {}
    for coeff in (0.0, 1.0):
        layer = csa_layer(layout, **modes(coeff)[mode])
        layer.train()
        x_in = x.clone().requires_grad_()
        output, _ = layer(x_in)
        (output * output_grad).sum().backward()
        grads[coeff] = {"input": x_in.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, grad in grads[0.0].items():
        if name.startswith("indexer."):
            assert grad is None, f"{name} gets a gradient from the LM loss"
            assert grads[1.0][name] is not None and grads[1.0][name].abs().max() > 0, name
        else:
            assert torch.equal(grad, grads[1.0][name]), name


@pytest.mark.parametrize("length", LENGTHS)
def test_dense_csa_attends_every_visible_entry(layout, length):
    """csa_dense_attention: the output of HCA-style attention over all visible entries, with no
    indexer compute (without the loss, in evaluation)."""
    layer = csa_layer(layout, csa_dense_attention=True).eval()
    x = torch.randn(length, BATCH, HIDDEN, generator=torch.Generator().manual_seed(length))
    calls = []
    layer.indexer.register_forward_pre_hook(lambda *args: calls.append("indexer"))
    layer.indexer.compressor.register_forward_pre_hook(lambda *args: calls.append("indexer.compressor"))
    with torch.no_grad():
        output, _ = layer(x)
        assert calls == []
        _, visible = reference_indexer_scores(layer, x)
        expected, _ = reference_attention(layer, x, visible)
        sparse = csa_layer(layout).eval()(x)[0]
    assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()
    if length > INDEX_TOPK * M + M:  # more entries than the top-k: sparse attention differs
        assert (sparse - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(indexer_loss_coeff=1.0, indexer_use_sparse_loss=True, csa_dense_attention=True),
         "set indexer_use_sparse_loss=False (dense loss) for the indexer warm-up"),
        (dict(indexer_loss_coeff=1.0), "set csa_dense_attention=True (indexer warm-up) or indexer_use_sparse_loss=True"),
        (dict(indexer_loss_coeff=-1.0), "indexer_loss_coeff=-1.0 must be >= 0"),
        (dict(indexer_loss_coeff=1.0, csa_dense_attention=True, calculate_per_token_loss=True),
         "set calculate_per_token_loss=False"),
    ],
    ids=["sparse-loss-dense-attention", "dense-loss-topk-attention", "negative", "per-token-loss"],
)
def test_inconsistent_phases_are_refused(layout, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        csa_layer(layout, **overrides)


def topk_recall(layer, x) -> tuple[float, float]:
    """Mean, over queries that see more entries than the top-k, of the teacher's mass on the
    indexer's top-k; and on the teacher's own top-k (the best any indexer can do)."""
    with torch.no_grad():
        scores, visible = reference_indexer_scores(layer, x)
        _, entry_p = reference_attention(layer, x, visible)
        teacher = entry_p.sum(dim=2)
        teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-30)
        rows = visible.sum(-1) > INDEX_TOPK
        recall = teacher.gather(-1, scores.topk(INDEX_TOPK, dim=-1).indices).sum(-1)[rows].mean()
        best = teacher.topk(INDEX_TOPK, dim=-1).values.sum(-1)[rows].mean()
        return recall.item(), best.item()


def test_indexer_warm_up_learns_the_attention(layout):
    """Indexer warm-up: dense attention and dense loss, every parameter frozen but the indexer's,
    100 Adam steps on sequences of a 16-token vocabulary; the top-k recall of held-out
    sequences rises well above the random start."""
    layer = csa_layer(layout, seed=3, **modes()["dense"])
    with torch.no_grad():  # larger entries: a peaked attention, whose top-k matters
        layer.compressor.norm.weight.mul_(3.0)
    for name, param in layer.named_parameters():
        param.requires_grad_(name.startswith("indexer."))
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(11)
    embeddings = torch.randn(16, HIDDEN, generator=generator)

    def batch():
        return embeddings[torch.randint(0, 16, (64, 4), generator=generator)]

    held_out = batch()
    before, best = topk_recall(layer, held_out)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        output, _ = layer(batch())
        output.backward(torch.zeros_like(output))
        losses.append(IndexerLossTracker.sums[1].item())
        IndexerLossTracker.reset()
        optimizer.step()
    after, _ = topk_recall(layer, held_out)
    print(f"top-{INDEX_TOPK} recall of the attention's entry mass: {before:.3f} -> {after:.3f} "
          f"(the attention's own top-{INDEX_TOPK}: {best:.3f}); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert after > before + 0.1
    assert losses[-1] < 0.7 * losses[0]


INDEXER_TRAINING = dict(indexer_loss_coeff=1.0, indexer_use_sparse_loss=True)
LAYOUT_RUNS = {
    1: [({}, INDEXER_TRAINING),
        ({}, dict(INDEXER_TRAINING, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))],
    2: [(dict(tp=2, sp=True), INDEXER_TRAINING), (dict(ep=2), INDEXER_TRAINING), (dict(pp=2), INDEXER_TRAINING),
        (dict(pp=2, vpp=2), INDEXER_TRAINING)],
    4: [(dict(tp=2, sp=True, pp=2), INDEXER_TRAINING)],
}
LAYOUT_TAGS = {1: ["one-rank", "recompute"], 2: ["tp2sp", "ep2", "pp2", "pp2-vpp2"], 4: ["tp2sp-pp2"]}


@pytest.mark.timeout(600)
def test_layouts_train_the_indexer_like_one_rank():
    """Indexer loss (sparse phase), its logged value and every gradient and weight over three
    steps: TP2+SP (the teacher all-reduced over TP), EP2, PP2, PP2 with virtual stages, TP2+SP+PP2
    and full recompute
    against one rank. One group of ranks per world size."""
    ((reference, recomputed),) = run_on_ranks(layout_ranks.train_runs, 1, LAYOUT_RUNS[1], timeout=300)
    assert min(reference["indexer_losses"]) > 0
    assert all(reference["grads"][name].abs().max() > 0 for name in reference["grads"] if ".indexer." in name)
    runs = {"recompute": [recomputed]}
    for world in (2, 4):
        per_rank = run_on_ranks(layout_ranks.train_runs, world, LAYOUT_RUNS[world], reference["initial"], timeout=300)
        for i, tag in enumerate(LAYOUT_TAGS[world]):
            runs[tag] = [rank_results[i] for rank_results in per_rank]
    print(f"indexer losses (one rank): {reference['indexer_losses']}")
    for tag, results in runs.items():
        for result in results:
            diff = max(abs(a - b) / b for a, b in zip(result["indexer_losses"], reference["indexer_losses"]))
            assert diff <= TOLERANCE, (tag, result["indexer_losses"], reference["indexer_losses"])
        _check_logits(results, reference, tag)
        _check_training(results, reference, tag)
