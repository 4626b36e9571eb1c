"""The bridge at parallel layouts: a checkpoint loaded straight into TP / EP / PP and combinations.

For each layout: every rank's tensors are exactly its slice of the one-rank
model's, the export from the layout (to every rank, to rank 0, and the saved
checkpoint) is bit-identical to the one-rank export and to the source
checkpoint, and the logits equal the one-rank logits. Each rank reads from the
checkpoint exactly the elements it holds, nothing more (only an FP8/FP4 tensor
is read whole before slicing: its scales cover blocks that a slice may cut).
"""

import pytest
import torch

import megatron_v4
from bridge import AutoBridge
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE
from bridge.safetensors_io import SafetensorsCheckpoint
from bridge.tiny import make_tiny_checkpoint
from bridge_layout_ranks import load_and_export
from megatron_v4.runtime.ranks import run_on_ranks

QUANTISED = "official-fp8-fp4"
LAYOUTS = {
    "tp2": (2, dict(tp=2), OFFICIAL),
    "ep2": (2, dict(ep=2), OFFICIAL),
    "pp2": (2, dict(pp=2), OFFICIAL),
    "tp2-ep2": (4, dict(tp=2, ep=2), OFFICIAL),
    "pp2-ep2": (4, dict(pp=2, ep=2), OFFICIAL),
    "pp2-vpp2": (2, dict(pp=2, vpp=2), OFFICIAL),
    "pp3-uneven": (3, dict(pp=3), OFFICIAL),
    "tp2-sp": (2, dict(tp=2, sp=True), OFFICIAL),
    "tp2-sp-pp2": (4, dict(tp=2, sp=True, pp=2), OFFICIAL),
    "tp2-ep2-etp2": (4, dict(tp=2, ep=2, etp=2), OFFICIAL),
    # transformers' stacked experts [E, 2I, D], each rank reading its experts' rows of the stack
    "tp2-ep2-stacked": (4, dict(tp=2, ep=2), TRANSFORMERS_MODULE),
    "tp2-ep2-fp8-fp4": (4, dict(tp=2, ep=2), QUANTISED),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights in the official and the stacked transformers naming, and quantised."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        OFFICIAL: make_tiny_checkpoint(root / "official", seed=5),
        TRANSFORMERS_MODULE: make_tiny_checkpoint(root / "module", naming=TRANSFORMERS_MODULE, seed=5, with_mtp=True),
        QUANTISED: make_tiny_checkpoint(root / "quantised", seed=5, quantised=True),
    }


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _one_rank(checkpoint, token_ids):
    """The one-rank model's tensors, export and logits."""
    megatron_v4.initialize()
    try:
        bridge = AutoBridge.from_hf_pretrained(checkpoint)
        (model,) = bridge.to_megatron_model(dtype=torch.float32)
        state = {name: t.clone() for name, t in model.state_dict().items() if not name.endswith("_extra_state")}
        export = dict(bridge.export_hf_weights([model]))
        model.eval()
        with torch.no_grad():
            logits = model(token_ids)
    finally:
        megatron_v4.destroy()
    return dict(state=state, export=export, logits=logits)


@pytest.fixture(scope="module")
def one_rank(checkpoints, token_ids):
    """Per source: the one-rank reference (the two unquantised sources hold the same weights)."""
    official = _one_rank(checkpoints[OFFICIAL], token_ids)
    return {OFFICIAL: official, TRANSFORMERS_MODULE: official, QUANTISED: _one_rank(checkpoints[QUANTISED], token_ids)}


def _expected_slice(full: torch.Tensor, description) -> torch.Tensor:
    if description is None:
        return full
    dim, rank, size, glu = description
    halves = full.chunk(2, dim=dim) if glu else (full,)
    return torch.cat([half.chunk(size, dim=dim)[rank] for half in halves], dim=dim)


def _assert_bit_identical(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), f"{what}: tensor names differ"
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name} differs"


def test_one_rank_export_is_the_source_checkpoint(checkpoints, one_rank):
    source = dict(SafetensorsCheckpoint(checkpoints[OFFICIAL]).items())
    _assert_bit_identical(one_rank[OFFICIAL]["export"], source, "one-rank export vs source")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_load_into_layout_and_export_back(layout, checkpoints, token_ids, one_rank, tmp_path):
    world, sizes, source = LAYOUTS[layout]
    reference = one_rank[source]
    results = run_on_ranks(load_and_export, world, checkpoints[source], sizes, str(tmp_path), token_ids, timeout=200)

    seen = set()
    model_elements = sum(t.numel() for t in reference["state"].values())
    for rank, result in enumerate(results):
        for name, (tensor, description) in result["held"].items():
            expected = _expected_slice(reference["state"][name], description)
            assert torch.equal(tensor, expected), f"rank {rank}: {name} is not its slice of the one-rank tensor"
            seen.add(name)
        held_elements = sum(t.numel() for t, _ in result["held"].values())
        reads = result["reads"]
        print(f"[{layout} rank {rank}] read {reads} elements; holds {held_elements} of {model_elements}")
        assert held_elements < model_elements
        assert reads["sliced"] == held_elements, "a rank read other slices than those it holds"
        assert (reads["whole"] > 0) == (source == QUANTISED), "only FP8/FP4 tensors are read whole"
        _assert_bit_identical(result["export_all"], reference["export"], f"rank {rank} export")
        assert (result["export_rank0"] == {}) == (rank != 0)
        diff = (result["logits"] - reference["logits"]).abs().max().item()
        print(f"[{layout} rank {rank}] logits max|diff| vs one rank = {diff:.3e}")
        assert diff <= 1e-5 * reference["logits"].abs().max().item()
    if layout == "pp3-uneven":  # 4 layers over 3 stages: the first stage takes the extra one
        layers = [{n.split(".")[2] for n in r["held"] if n.startswith("decoder.layers.")} for r in results]
        assert [sorted(stage) for stage in layers] == [["0", "1"], ["2"], ["3"]]
    assert seen == set(reference["state"]), f"tensors no rank holds: {sorted(set(reference['state']) - seen)[:3]}"
    _assert_bit_identical(results[0]["export_rank0"], reference["export"], "rank-0 export")
    if source != QUANTISED:  # a quantised source comes back dequantised
        want = dict(SafetensorsCheckpoint(checkpoints[source]).items())
        _assert_bit_identical(results[0]["export_in_source_naming"], want, f"export in the {source} naming")
    _assert_bit_identical(dict(SafetensorsCheckpoint(tmp_path).items()), reference["export"], "saved checkpoint")
