"""DeepSeekV4Model at every parallel layout equals the one-rank model (fp32, gloo).

The model: sliding, CSA and HCA layers, three hash-routed layers (one on the
second pipeline stage), four experts with learned expert biases, one MTP layer.
A one-rank run draws the weights and is the reference; every layout loads the
same weights sliced its way and must give the same `forward_logits`, the same
main and MTP losses, the same gradient for every parameter (after DDP and
`finalize_model_grads`), and the same weights and expert biases after three
Adam steps of Megatron-Core's optimizer.

Tolerances (fp32): logits, losses and grad norms 1e-5 relative to their scale;
weights after three steps 1e-5 in relative Frobenius norm per parameter; expert
biases move by a fixed step in the direction of the load imbalance, so they must
be bit-identical. Gradients: 1e-5 in Frobenius norm per parameter, relative to
the larger of the parameter's gradient norm and the share of the total gradient
norm its size would carry if the gradient were spread evenly
(|G| * sqrt(numel / total numel)). That share only matters for parameters whose
gradient is a sum of many terms that nearly cancel, e.g. the single hc_head scale
(gradient 3e-4, sum of ~2000 terms of up to 1e-4 each, where fp32 reduction-order
noise alone reaches 2e-5 of it); a missing or doubled reduction is still off by
O(1) of either yardstick.
"""

from __future__ import annotations

import re

import pytest
import torch

import dsv4_layout_ranks as ranks
from megatron_v4 import ParallelLayout
from megatron_v4.runtime.ranks import run_on_ranks

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    (result,) = run_on_ranks(ranks.train, 1, {}, None, timeout=120)
    return result


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.norm()
    return 0.0 if scale == 0 and a.norm() == 0 else ((a - b).norm() / scale).item()


def _check_logits(results, reference, tag):
    worst = 0.0
    for result in results:
        rows = slice(*result["logits_rows"])
        expected = reference["logits"][rows]
        worst = max(worst, ((result["logits"] - expected).abs().max() / expected.abs().max()).item())
    print(f"[{tag}] logits max|diff|/max|ref| = {worst:.2e}")
    assert worst <= TOLERANCE


def _gradient_scales(reference) -> dict[str, float]:
    grads = reference["grads"]
    total_norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    total_numel = sum(g.numel() for g in grads.values())
    return {
        name: max(g.norm().item(), (total_norm * (g.numel() / total_numel) ** 0.5).item())
        for name, g in grads.items()
    }


def _check_training(results, reference, tag, weight_tolerance=TOLERANCE):
    scales = _gradient_scales(reference)
    worst_scalar = {}
    for result in results:
        for key in ("losses", "mtp_losses", "grad_norms"):
            if result[key]:
                diff = max(abs(a - b) / abs(b) for a, b in zip(result[key], reference[key]))
                worst_scalar[key] = max(worst_scalar.get(key, 0.0), diff)
                assert diff <= TOLERANCE, (tag, key, result[key], reference[key])
    print(f"[{tag}] relative diffs over {ranks.STEPS} steps: "
          + ", ".join(f"{key} {value:.1e}" for key, value in worst_scalar.items()))
    grads, final = {}, {}
    for result in results:
        for name, grad in result["grads"].items():
            error = (grad - reference["grads"][name]).norm().item() / scales[name]
            grads[name] = max(grads.get(name, 0.0), error)
        for name, value in result["final"].items():
            if name.endswith("expert_bias") or name.endswith("tid2eid"):
                assert torch.equal(value, reference["final"][name]), (tag, name)
                continue
            final[name] = max(final.get(name, 0.0), _relative(value, reference["final"][name]))
    assert set(grads) == set(reference["grads"]), set(reference["grads"]) ^ set(grads)
    assert set(final) | {n for n in reference["final"] if n.endswith(("expert_bias", "tid2eid"))} == set(
        reference["final"]
    )
    worst_grad = max(grads, key=grads.get)
    worst_weight = max(final, key=final.get)
    print(f"[{tag}] worst grad error {grads[worst_grad]:.2e} ({worst_grad})")
    print(f"[{tag}] worst weight rel Frobenius after {ranks.STEPS} steps {final[worst_weight]:.2e} "
          f"({worst_weight})")
    assert grads[worst_grad] <= TOLERANCE, (worst_grad, grads[worst_grad])
    assert final[worst_weight] <= weight_tolerance, (worst_weight, final[worst_weight])


ONE_STAGE = {((1, 2, 3, 4),)}
TWO_STAGES = {((1, 2),), ((3, 4),)}  # layer 3 (hash-routed) on the second stage
# (ranks, initialize() arguments, config overrides, the decoder layers of each rank's chunks)
LAYOUTS = {
    "tp2sp": (2, dict(tp=2, sp=True), {}, ONE_STAGE),
    "ep2-alltoall": (2, dict(ep=2), dict(moe_token_dispatcher_type="alltoall"), ONE_STAGE),
    "pp2": (2, dict(pp=2), {}, TWO_STAGES),
    "pp2-vpp2": (2, dict(pp=2, vpp=2), {}, {((1,), (3,)), ((2,), (4,))}),
    "pp2-user-layout": (
        2, dict(pp=2), dict(pipeline_model_parallel_layout="Et|tttmL"), {((1,),), ((2, 3, 4),)}
    ),
    "pp3-uneven": (3, dict(pp=3), {}, {((1, 2),), ((3,),), ((4,),)}),
    "tp2sp-ep2": (4, dict(tp=2, sp=True, ep=2), {}, ONE_STAGE),
    # (alltoall with etp > 1 all-gathers uneven token counts over the ETP group, which gloo lacks)
    "tp2sp-ep2-etp2": (4, dict(tp=2, sp=True, ep=2, etp=2), {}, ONE_STAGE),
    "pp2-ep2-alltoall": (4, dict(pp=2, ep=2), dict(moe_token_dispatcher_type="alltoall"), TWO_STAGES),
    "tp2sp-pp2": (4, dict(tp=2, sp=True, pp=2), {}, TWO_STAGES),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_layout_trains_like_one_rank(reference, tag):
    world, layout, overrides, placement = LAYOUTS[tag]
    results = run_on_ranks(ranks.train, world, layout, reference["initial"], overrides, timeout=240)
    assert {tuple(map(tuple, result["stage_layers"])) for result in results} == placement
    _check_logits(results, reference, tag)
    _check_training(results, reference, tag)


@pytest.mark.timeout(120)
def test_tensor_parallel_without_sequence_parallel_gives_the_same_logits(reference):
    """Without sequence parallelism Megatron-Core's MoE cannot train at TP > 1 (see
    megatron_v4.moe); evaluation works, and forward_logits gathers the vocabulary."""
    results = run_on_ranks(ranks.train, 2, dict(tp=2), reference["initial"], None, False, timeout=120)
    _check_logits(results, reference, "tp2")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world,layout", [(4, dict(tp=2, sp=True, ep=2)), (2, dict(pp=2))], ids=["tp2sp-ep2", "pp2"]
)
def test_distributed_checkpoint_from_a_layout_loads_at_one_rank(reference, tmp_path, world, layout):
    """Every tensor is written once with its global shape and offset (TP slices, replicated
    tensors, experts, MTP, routing buffers), so one rank reads back the full weights."""
    run_on_ranks(ranks.save_checkpoint, world, layout, reference["initial"], str(tmp_path), timeout=120)
    (loaded,) = run_on_ranks(ranks.load_checkpoint, 1, {}, str(tmp_path), timeout=120)
    assert set(loaded) == set(reference["initial"])
    for name, value in loaded.items():
        assert torch.equal(value, reference["initial"][name]), name


@pytest.mark.parametrize(
    "sizes,overrides,message",
    [
        (dict(tp=3), {}, "num_attention_heads=4 is not divisible by tp=3; use tp in {1, 2, 4}"),
        (dict(tp=4), {}, "o_groups=2 is not divisible by tp=4; use tp in {1, 2}"),
        (
            dict(tp=4),
            dict(o_groups=4, index_n_heads=6),
            "index_n_heads=6 is not divisible by tp=4; use tp in {1, 2, 3, 6}",
        ),
        (dict(ep=3), {}, "num_moe_experts=4 is not divisible by ep=3; use ep in {1, 2, 4}"),
        (dict(etp=3), {}, "moe_ffn_hidden_size=16 is not divisible by etp=3; use etp in {1, 2, 4, 8, 16}"),
        (
            dict(pp=5),
            {},
            "num_layers=4 cannot give each of the pp*vpp=5 pipeline stages a layer; use pp*vpp <= 4",
        ),
        (dict(pp=2, vpp=3), {}, "num_layers=4 cannot give each of the pp*vpp=6 pipeline stages a layer"),
        (dict(pp=2), dict(pipeline_model_parallel_layout="Ettttm|L"), "puts the MTP layers before the last"),
    ],
    ids=["heads", "o_groups", "index_heads", "experts", "expert_ffn", "stages", "virtual_stages", "mtp_stage"],
)
def test_sizes_that_do_not_divide_are_refused_up_front(sizes, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ranks.tiny_config(ParallelLayout(**sizes), **overrides)


def test_uneven_pipeline_split_is_computed_with_mtp_last():
    config = ranks.tiny_config(ParallelLayout(pp=3))
    stages = [[str(layer) for layer in stage[0]] for stage in config.pipeline_model_parallel_layout.layout]
    assert [stage.count("LayerType.decoder") for stage in stages] == [2, 1, 1]
    assert stages[0][0] == "LayerType.embedding"
    assert stages[-1][-2:] == ["LayerType.mtp", "LayerType.loss"]
    even = ranks.tiny_config(ParallelLayout(pp=2, vpp=2))
    assert even.pipeline_model_parallel_layout is None  # Megatron-Core's own even split
