"""DeepSeekV4Model split over two pipeline stages (gloo ranks, Megatron-Core's 1F1B schedule).

Layers 0-1 (HCA, hash-routed) on stage 0, layers 2-3 (sliding; layer 2
hash-routed, so token ids must reach the second stage) on stage 1. Loss and
every gradient must match transformers' model on the same micro-batches.
"""

import pytest

import dsv4_pipeline_ranks as ranks
from megatron_v4.testing import run_on_ranks


@pytest.mark.timeout(300)
def test_two_stage_pipeline_matches_transformers():
    stage0, stage1 = run_on_ranks(ranks.pipeline_step, 2, 2, 130, 2, timeout=240)
    assert stage0["layers"] == [1, 2] and stage1["layers"] == [3, 4]
    loss_diff = (stage1["loss"] - stage1["hf_loss"]).abs().max().item()
    print(f"[pp2] losses {stage1['loss'].tolist()} vs {stage1['hf_loss'].tolist()}")
    assert loss_diff <= 1e-5 * stage1["hf_loss"].abs().max().item()
    errors = {**stage0["grad_errors"], **stage1["grad_errors"]}
    assert any(name.startswith("embedding.") for name in stage0["grad_errors"])
    assert any(name.startswith("output_layer.") for name in stage1["grad_errors"])
    worst = max(errors, key=errors.get)
    print(f"[pp2] worst grad rel Frobenius={errors[worst]:.3e} ({worst})")
    assert errors[worst] <= 1e-4, (worst, errors[worst])
