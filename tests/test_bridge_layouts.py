"""The bridge at parallel layouts: a checkpoint loaded straight into TP / EP / PP and combinations.

For each layout: every rank's tensors are exactly its slice of the one-rank
model's, the export from the layout (to every rank, to rank 0, and the saved
checkpoint) is bit-identical to the one-rank export and to the source
checkpoint, and the logits equal the one-rank logits. Each rank reads from the
checkpoint exactly the elements it holds, nothing more.
"""

import pytest
import torch

import megatron_v4
from bridge import AutoBridge
from bridge.safetensors_io import SafetensorsCheckpoint
from bridge.tiny import make_tiny_checkpoint
from bridge_layout_ranks import load_and_export
from megatron_v4.testing import run_on_ranks

LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "ep2": (2, dict(ep=2)),
    "pp2": (2, dict(pp=2)),
    "tp2-ep2": (4, dict(tp=2, ep=2)),
    "pp2-ep2": (4, dict(pp=2, ep=2)),
    "pp2-vpp2": (2, dict(pp=2, vpp=2)),
    "tp2-ep2-etp2": (4, dict(tp=2, ep=2, etp=2)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "official", seed=5)


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_rank(checkpoint, token_ids):
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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_load_into_layout_and_export_back(layout, checkpoint, token_ids, one_rank, tmp_path):
    world, sizes = LAYOUTS[layout]
    results = run_on_ranks(load_and_export, world, checkpoint, sizes, str(tmp_path), token_ids, timeout=200)
    source = dict(SafetensorsCheckpoint(checkpoint).items())
    _assert_bit_identical(one_rank["export"], source, "one-rank export vs source")

    seen = set()
    model_elements = sum(t.numel() for t in one_rank["state"].values())
    for rank, result in enumerate(results):
        held_elements = sum(t.numel() for t, _ in result["held"].values())
        print(f"[{layout} rank {rank}] read {result['reads']['sliced']} of the model's {model_elements} elements")
        assert result["reads"] == {"sliced": held_elements, "whole": 0}, "a rank read more than it holds"
        assert held_elements < model_elements
        for name, (tensor, description) in result["held"].items():
            expected = _expected_slice(one_rank["state"][name], description)
            assert torch.equal(tensor, expected), f"rank {rank}: {name} is not its slice of the one-rank tensor"
            seen.add(name)
        _assert_bit_identical(result["export_all"], one_rank["export"], f"rank {rank} export")
        assert (result["export_rank0"] == {}) == (rank != 0)
        if result["logits"] is None:
            continue
        diff = (result["logits"] - one_rank["logits"]).abs().max().item()
        print(f"[{layout} rank {rank}] logits max|diff| vs one rank = {diff:.3e}")
        assert diff <= 1e-5 * one_rank["logits"].abs().max().item()
    assert results[-1]["logits"] is not None
    assert seen == set(one_rank["state"]), f"tensors no rank holds: {sorted(set(one_rank['state']) - seen)[:3]}"
    _assert_bit_identical(results[0]["export_rank0"], one_rank["export"], "rank-0 export")
    _assert_bit_identical(dict(SafetensorsCheckpoint(tmp_path).items()), source, "saved checkpoint")
