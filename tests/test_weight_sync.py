"""Weight sync for RL trainers: `export_hf_weights` in buckets from TP2xEP2 and PP2 gives the one-rank
export byte for byte, each tensor on exactly one rank with `ranks="owner"`; `load_hf_weights` updates a
live model in place (same tensor objects) from buckets of another checkpoint's tensors in another naming,
after which the export is that checkpoint's bytes and the logits are those of a model loaded fresh from it.
At one rank: re-quantised export is the FP8/FP4 release checkpoint byte for byte and loads back; wrong
input is refused naming the tensor.
"""

import pytest
import torch
from weight_sync_ranks import export_then_update

import megatron_v4
from bridge import AutoBridge
from bridge.hf_naming import TRANSFORMERS_MODULE
from bridge.safetensors_io import SafetensorsCheckpoint
from bridge.tiny import make_tiny_checkpoint
from megatron_v4.runtime.ranks import run_on_ranks

BUCKET_BYTES = 20_000  # the tiny fp32 model is ~1.6 MB: dozens of buckets, some tensors bigger than one
LAYOUTS = {"tp2-ep2": (4, dict(tp=2, ep=2)), "pp2": (2, dict(pp=2))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different weights (the second also in transformers' stacked-expert naming), and FP8/FP4 ones."""
    root = tmp_path_factory.mktemp("sync")
    return dict(
        first=make_tiny_checkpoint(root / "first", seed=5),
        second=make_tiny_checkpoint(root / "second", seed=7),
        second_module=make_tiny_checkpoint(root / "second-module", naming=TRANSFORMERS_MODULE, seed=7, with_mtp=True),
        quantised=make_tiny_checkpoint(root / "quantised", seed=5, quantised=True),
    )


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def single_rank():
    megatron_v4.initialize()
    yield
    megatron_v4.destroy()


def _read(path) -> dict:
    return dict(SafetensorsCheckpoint(path).items())


def _fresh(path, token_ids) -> dict:
    """A one-rank model loaded from `path`: its per-tensor export, state and logits."""
    megatron_v4.initialize()
    try:
        bridge = AutoBridge.from_hf_pretrained(path)
        (model,) = bridge.to_megatron_model(dtype=torch.float32)
        export = {n: t.clone() for n, t in bridge.export_hf_weights(model)}
        state = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith("_extra_state")}
        logits = megatron_v4.forward_logits([model], token_ids)
    finally:
        megatron_v4.destroy()
    return dict(export=export, state=state, logits=logits)


def _assert_same_bytes(got: dict, want: dict, what: str):
    assert list(got) == list(want) or sorted(got) == sorted(want), f"{what}: tensor names differ"
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name} differs"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_bucketed_export_and_in_place_update_at_a_layout(layout, checkpoints, token_ids):
    world, sizes = LAYOUTS[layout]
    first = _fresh(checkpoints["first"], token_ids)
    second = _fresh(checkpoints["second"], token_ids)
    results = run_on_ranks(
        export_then_update,
        world,
        checkpoints["first"],
        checkpoints["second_module"],
        sizes,
        BUCKET_BYTES,
        token_ids,
        timeout=240,
    )
    owners = {}
    for rank, result in enumerate(results):
        flat = [pair for bucket in result["buckets"] for pair in bucket]
        assert [n for n, _ in flat] == list(first["export"]), f"rank {rank}: order or names differ from one rank"
        _assert_same_bytes(dict(flat), first["export"], f"rank {rank} bucketed export")
        sizes_ = [sum(t.nbytes for _, t in bucket) for bucket in result["buckets"]]
        assert all(size <= BUCKET_BYTES or len(b) == 1 for size, b in zip(sizes_, result["buckets"]))
        assert len(sizes_) > 3 and max(sizes_) > BUCKET_BYTES  # several buckets, one tensor alone
        for name in result["owned"]:
            assert name not in owners, f"{name} exported by ranks {owners[name]} and {rank}"
            owners[name] = rank
        _assert_same_bytes(result["owned"], {n: first["export"][n] for n in result["owned"]}, f"rank {rank} owned")
        assert result["same_tensors"], f"rank {rank}: the update replaced tensors instead of copying into them"
        _assert_same_bytes(result["updated"], _read(checkpoints["second"]), f"rank {rank} export after update")
        diff = (result["logits"] - second["logits"]).abs().max().item()
        print(f"[{layout} rank {rank}] {len(result['buckets'])} buckets; updated logits max|diff| {diff:.2e}")
        assert diff <= 1e-5 * second["logits"].abs().max().item()
        assert not torch.allclose(result["logits"], first["logits"])
    assert sorted(owners) == sorted(first["export"]), "with ranks='owner' some tensor came from no rank"
    assert len(set(owners.values())) == 2  # each pipeline stage (PP2) or expert-parallel rank (EP2) sends its own


def test_release_format_round_trip_and_in_place_load(single_rank, checkpoints):
    source = _read(checkpoints["quantised"])
    bridge = AutoBridge.from_hf_pretrained(checkpoints["quantised"])
    (model,) = bridge.to_megatron_model(dtype=torch.float32)
    reference = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith("_extra_state")}
    exported = [
        pair for bucket in bridge.export_hf_weights(model, dtype="source", bucket_bytes=BUCKET_BYTES) for pair in bucket
    ]
    assert any(t.dtype == torch.float8_e4m3fn for _, t in exported) and any(t.dtype == torch.int8 for _, t in exported)
    _assert_same_bytes(dict(exported), source, "re-quantised export vs the FP8/FP4 checkpoint")

    other = AutoBridge.from_hf_pretrained(checkpoints["first"])
    pointers = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    other.load_hf_weights(model, _read(checkpoints["first"]))
    assert not torch.equal(
        model.state_dict()["embedding.word_embeddings.weight"], reference["embedding.word_embeddings.weight"]
    )
    bridge.load_hf_weights(model, iter(exported))  # FP8/FP4 with their scales, as a stream
    assert pointers == {
        n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)
    }
    for name, tensor in reference.items():
        assert torch.equal(model.state_dict()[name], tensor), f"{name}: in-place load differs from a fresh load"
    bf16 = dict(bridge.export_hf_weights(model, dtype="bf16"))
    assert bf16["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16 and "layers.0.attn.wq_a.scale" not in bf16
    assert bf16["layers.0.hc_attn_fn"].dtype == torch.float32  # the release's fp32 tensors stay fp32


def test_wrong_tensors_are_refused_naming_them(single_rank, checkpoints):
    bridge = AutoBridge.from_hf_pretrained(checkpoints["first"])
    (model,) = bridge.to_megatron_model(dtype=torch.float32)
    weights = _read(checkpoints["first"])
    with pytest.raises(KeyError, match="layers.0.attn.not_a_tensor"):
        bridge.load_hf_weights(model, {"layers.0.attn.not_a_tensor": torch.zeros(1)})
    with pytest.raises(KeyError, match="layers.9.attn.wq_a.weight"):
        bridge.load_hf_weights(model, {"layers.9.attn.wq_a.weight": weights["layers.0.attn.wq_a.weight"]})
    with pytest.raises(ValueError, match=r"layers.1.attn.wq_b.weight.*\(3, 64\)"):
        bridge.load_hf_weights(model, {"layers.1.attn.wq_b.weight": torch.zeros(3, 64)}, strict=False)
    missing = dict(weights)
    del missing["layers.2.ffn.experts.1.w3.weight"]
    with pytest.raises(KeyError, match="layers.2.ffn.experts.1.w3.weight"):
        bridge.load_hf_weights(model, missing)
    with pytest.raises(ValueError, match="naming='official'"):
        bridge.export_hf_weights(model, naming=TRANSFORMERS_MODULE, dtype="source")
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        next(bridge.export_hf_weights(model, bucket_bytes=0))
