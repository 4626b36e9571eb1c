"""DeepSeekV4Model on two gloo ranks: pipeline, tensor and expert parallel, against transformers.

Pipeline: layers 0-1 (HCA, hash-routed) on stage 0, layers 2-3 (sliding; layer
2 hash-routed, so token ids must reach the second stage) on stage 1, run by
Megatron-Core's 1F1B schedule. Tensor / expert parallel: a sliding, a CSA and
an HCA layer plus MTP. Loss and every gradient must match transformers' model
(and the spec-level MTP reference) on the same data.
"""

import pytest

import dsv4_parallel_ranks as ranks
from megatron_v4.runtime.ranks import run_on_ranks


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_tensor_or_expert_parallel_with_mtp_matches_transformers(tp, ep):
    results = run_on_ranks(ranks.tensor_or_expert_parallel_step, 2, tp, ep, 9, timeout=240)
    errors = {}
    for rank, result in enumerate(results):
        print(
            f"[tp{tp}-ep{ep} rank {rank}] logits max|diff|={result['logits_diff']:.3e}; "
            f"loss ours={result['loss']:.6f} hf={result['hf_loss']:.6f}"
        )
        assert result["logits_diff"] <= 1e-5 * result["logits_scale"]
        assert abs(result["loss"] - result["hf_loss"]) <= 1e-5 * result["hf_loss"]
        for name, error in result["grad_errors"].items():
            errors[name] = max(errors.get(name, 0.0), error)
    if ep > 1:
        assert {f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)} <= set(errors)
    worst = max(errors, key=errors.get)
    print(f"[tp{tp}-ep{ep}] worst grad rel Frobenius={errors[worst]:.3e} ({worst})")
    assert errors[worst] <= 1e-4, (worst, errors[worst])
