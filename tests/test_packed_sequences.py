"""Packed rows of documents (THD, `megatron_v4.packing`) against each document alone, float32.

A row packs documents whose lengths cross the sliding window (8), the CSA ratio (4) and the HCA
ratio (128), including a 1-token document. Each document must get the logits, loss and gradients it
gets alone: the logits and loss of transformers' DeepseekV4ForCausalLM on that document alone, and,
summed over the documents, transformers' gradients of the per-document losses. MTP and the indexer
loss have no transformers counterpart: there each document's reference is our model run on the
document alone (itself checked against transformers by tests/test_model_parity.py), with the MTP and
indexer-loss scales set so that the alone runs add up to the packed row's normalisation.
Also at TP2+SP, EP2 and PP2 (tests/packed_ranks.py) and under full activation recompute.
"""

from __future__ import annotations

from itertools import pairwise

import packed_ranks
import pytest
import torch
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
from test_model_parity import build_ours, hf_model, hf_tensors, hf_to_ours, our_config, relative_frobenius

import megatron_v4
from megatron_v4.indexer_loss import IndexerLossAutoScaler
from megatron_v4.packing import document_loss_mask, document_positions, document_spans, packed_seq_params
from megatron_v4.runtime.ranks import run_on_ranks

pytestmark = pytest.mark.timeout(300)

PACKED, LENGTHS = packed_ranks.PACKED, packed_ranks.LENGTHS  # CSA, HCA, sliding, CSA; layer 0 hash-routed


@pytest.fixture(scope="module")
def layout():
    layout = megatron_v4.initialize(seed=1234)
    yield layout
    megatron_v4.destroy()


def test_boundary_helpers():
    assert document_positions([0, 1, 4, 6]).tolist() == [0, 0, 1, 2, 0, 1]
    assert document_loss_mask([0, 1, 4, 6]).tolist() == [0, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="must rise from 0 to the row length"):
        document_spans(packed_seq_params([0, 4, 3, 6]), 6)


def test_packed_row_matches_transformers_per_document_with_recompute(layout):
    """Logits (forward_logits with cu_seqlens), loss and gradients; the decoder fully recomputed."""
    hf, ours = packed_ranks.model_pair(
        PACKED, layout, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    result = packed_ranks.check_against_transformers(hf, ours)
    packed_ranks.assert_within(result, "one rank, recompute")


def test_packed_row_with_mtp_and_indexer_loss_matches_each_document_alone(layout):
    """MTP (its id shift and target stop at the boundary) and the indexer loss (candidates of the
    document only), under recompute: packed gradients are the sum of the alone runs' gradients."""
    config = our_config(
        PACKED,
        layout,
        mtp=1,
        indexer_loss_coeff=0.5,
        indexer_use_sparse_loss=True,
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    ours = build_ours(config)
    hf = hf_model(PACKED)
    own = ours.state_dict(keep_vars=True)
    with torch.no_grad():  # the main model's non-trivial tensors; MTP keeps its random initialisation
        for name, tensor in hf_to_ours(hf_tensors(hf), len(PACKED.compress_ratios)).items():
            own[name].copy_(tensor)
    ours.train()
    ids, labels, cu = packed_ranks.packed_batch(hf.config.vocab_size)
    total = ids.shape[1]

    def mtp_tokens(length):  # positions whose MTP target (two ahead) is inside the document
        return max(length - 2, 0)

    row_mtp_tokens = sum(mtp_tokens(n) for n in LENGTHS)
    try:
        ours.zero_grad(set_to_none=True)
        packed_loss = ours(ids, labels=labels, packed_seq_params=packed_seq_params(cu))
        assert packed_loss[0, torch.tensor(cu[1:]) - 1].abs().sum() == 0, "a document's last token is trained"
        packed_loss.sum().backward()
        packed_grads = {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}

        ours.zero_grad(set_to_none=True)
        alone_losses = []
        for (start, end), length in zip(pairwise(cu), LENGTHS):
            MTPLossAutoScaler.set_loss_scale(torch.tensor(mtp_tokens(length) / max(row_mtp_tokens, 1)))
            IndexerLossAutoScaler.set_loss_scale(torch.tensor(length / total))
            mask = document_loss_mask([0, length]).unsqueeze(0)
            loss = ours(ids[:, start:end], labels=labels[:, start:end], loss_mask=mask) * mask
            loss.sum().backward()
            alone_losses.append(loss.detach())
    finally:
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        IndexerLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    loss_error = relative_frobenius(packed_loss.detach(), torch.cat(alone_losses, dim=1))
    assert loss_error <= 1e-5, loss_error
    assert packed_grads.keys() == {name for name, p in ours.named_parameters() if p.grad is not None}
    assert any(name.startswith("mtp.") for name in packed_grads)
    assert any(".indexer." in name for name in packed_grads), "the indexer loss trained nothing"
    errors = {name: relative_frobenius(grad, ours.get_parameter(name).grad) for name, grad in packed_grads.items()}
    worst = sorted(errors, key=errors.get)[-4:]
    print(
        f"[mtp + indexer loss] loss rel {loss_error:.2e}; worst grad rel "
        + ", ".join(f"{n} {errors[n]:.1e}" for n in worst)
    )
    # As in tests/test_model_parity.py: the float32 Sinkhorn iterations of the hc parameters' gradients.
    assert errors[worst[-1]] <= 2e-4, (worst[-1], errors[worst[-1]])
    indexer_error = max(error for name, error in errors.items() if ".indexer." in name)
    assert indexer_error <= 1e-5, indexer_error


def test_packed_row_under_tensor_expert_and_pipeline_parallelism():
    """One group of two ranks runs TP2+SP, then EP2, then PP2 (1F1B), each against transformers."""
    results = run_on_ranks(packed_ranks.parallel_layouts, 2, timeout=280)
    for rank, result in enumerate(results):
        for name, layout_result in result.items():
            packed_ranks.assert_within(layout_result, f"{name} rank {rank}")
    assert {"tp2-sp", "ep2", "pp2"} <= set(results[0])
