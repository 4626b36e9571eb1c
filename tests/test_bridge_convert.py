"""Checkpoint conversion: `python -m bridge import|export|verify` on tiny checkpoints.

Round trips must give back every stored byte (bf16, fp32, FP8 with E8M0 and fp32
scales, FP4, int64 tid2eid, MTP) for every naming and for sharded input; the
imported checkpoint must load at other parallel layouts with the same outputs;
the FP8/FP4 arithmetic is checked against the format definitions written out
here; every bad input must fail with a one-line error and leave nothing behind.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge import convert
from bridge.cli import main as cli
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE, TRANSFORMERS_SAVED, TRANSLATORS, detect_naming
from bridge.quantisation import E8M0, FP4, FP8, SourceFormat, dequantise, fp4_pack, requantise
from bridge.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from bridge.tiny import make_tiny_checkpoint
from bridge.verify import verify
from megatron_v4.runtime.ranks import run_on_ranks

SMALL_BLOCK = (24, 24)
"""FP8 blocks for the tiny dims: several blocks per tensor, partial ones at the edges."""
SHARD_BYTES = 40_000


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def official_tensors(directory) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under official names (scales included)."""
    checkpoint = SafetensorsCheckpoint(directory)
    items = list(checkpoint.items())
    scales = [(n, t) for n, t in items if n.endswith(".scale") and n[: -len(".scale")] + ".weight" in dict(items)]
    weights = [(n, t) for n, t in items if (n, t) not in scales and not any(n == s for s, _ in scales)]
    naming = detect_naming([n for n, _ in weights])
    return {**dict(TRANSLATORS[naming].to_official(weights)), **dict(scales)}


def assert_bit_identical(source: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> None:
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        got = exported[name]
        assert got.dtype == tensor.dtype, (name, got.dtype, tensor.dtype)
        assert got.shape == tensor.shape, name
        assert torch.equal(_raw(got), _raw(tensor)), f"{name}: bytes differ"


ROUND_TRIPS = {
    # id: (checkpoint maker kwargs, import dtype)
    "official-fp8-e8m0-fp4-sharded": (dict(quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES), "bf16"),
    "official-fp8-fp32-scales-fp4": (dict(quantised=True, fp8_block=SMALL_BLOCK, fp8_scale_dtype=torch.float32), "bf16"),
    "official-fp32": (dict(), "fp32"),
    "transformers-saved-sharded": (dict(naming=TRANSFORMERS_SAVED, max_shard_bytes=SHARD_BYTES), "bf16"),
    "transformers-module-bf16": (dict(naming=TRANSFORMERS_MODULE, dtype=torch.bfloat16), "bf16"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_gives_back_every_byte(tmp_path, case, capsys):
    maker, import_dtype = ROUND_TRIPS[case]
    hf, mcore, exported = tmp_path / "hf", tmp_path / "mcore", tmp_path / "exported"
    make_tiny_checkpoint(hf, seed=3, **maker)
    if maker.get("max_shard_bytes"):
        assert (hf / INDEX_FILE).is_file()
    assert cli(["import", "--hf", str(hf), "--out", str(mcore), "--dtype", import_dtype, "--quiet"]) == 0
    sharded_output = ["--max-shard-gb", "0.00005"] if maker.get("max_shard_bytes") else []
    assert cli(["export", "--mcore", str(mcore), "--out", str(exported), "--quiet", *sharded_output]) == 0
    assert (exported / INDEX_FILE).is_file() == bool(sharded_output)
    source, result = official_tensors(hf), official_tensors(exported)
    assert_bit_identical(source, result)
    kinds = {t.dtype for t in source.values()}
    if maker.get("quantised"):
        assert {torch.float8_e4m3fn, torch.int8, torch.bfloat16, torch.float32, torch.int64} <= kinds
        assert any(n.startswith("mtp.0.") and t.dtype == torch.int8 for n, t in source.items())
        assert "0 blocks with a fresh scale" in capsys.readouterr().out
    record = json.loads((mcore / convert.RECORD_DIR / convert.RECORD_FILE).read_text())
    assert record["naming"] == maker.get("naming", OFFICIAL)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A quantised official checkpoint with MTP, imported in fp32."""
    root = tmp_path_factory.mktemp("imported")
    hf, mcore = root / "hf", root / "mcore"
    make_tiny_checkpoint(hf, seed=5, quantised=True, fp8_block=SMALL_BLOCK)
    convert.import_checkpoint(hf, mcore, torch.float32, progress=False, workers=2)  # one .distcp file each
    return hf, mcore


def test_verify_matches_transformers(imported, capsys):
    hf, mcore = imported
    report = verify(hf, mcore, sequences=2, seq_len=40, progress=False)
    assert [c.part for c in report.comparisons][-1] == "logits"
    assert all(c.relative <= 1e-4 for c in report.comparisons), report  # an fp32 import: only summation order differs
    assert report.argmax_agreement == 1.0
    assert cli(["verify", "--hf", str(hf), "--mcore", str(mcore), "--sequences", "1", "--seq-len", "16"]) == 0
    assert "OK" in capsys.readouterr().out


def test_bf16_export_holds_the_dequantised_values(imported, tmp_path):
    from bridge.hf_source import HFSource

    hf, mcore = imported
    out = tmp_path / "bf16"
    convert.export_checkpoint(mcore, out, "bf16", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    source, exported = HFSource(hf), HFSource(out)
    assert sorted(source.names()) == sorted(exported.names())
    for name in source.names():
        fmt, values = source.tensors[name].format, source.read(name)[0]
        got = exported.read(name)[0]
        assert exported.tensors[name].format.quant is None
        expected_dtype = torch.bfloat16 if fmt.quant or fmt.dtype == "bfloat16" else fmt.torch_dtype
        assert got.dtype == expected_dtype, name
        assert torch.equal(got, values.to(expected_dtype)), name


LAYOUTS = {"tp2": (dict(tp=2), {}), "ep2": (dict(ep=2), {}), "pp2": (dict(pp=2), {})}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_import_loads_at_other_layouts_with_the_same_outputs(imported, name):
    import megatron_v4
    from bridge.convert import load_megatron_model

    _, mcore = imported
    input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    megatron_v4.initialize()
    try:
        model = load_megatron_model(mcore)
        with torch.no_grad():
            logits = model(input_ids)
            per_token = model(input_ids, labels=torch.roll(input_ids, -1, dims=1))
    finally:
        megatron_v4.destroy()
    results = run_on_ranks(_outputs_at, 2, *LAYOUTS[name], str(mcore), input_ids, timeout=240)
    for rank_result in results:
        if "logits" in rank_result:
            assert (rank_result["logits"] - logits).abs().max() <= 1e-5 * logits.abs().max()
        if "per_token" in rank_result:
            assert (rank_result["per_token"] - per_token).abs().max() <= 1e-5 * per_token.abs().max()
    assert any(rank_result for rank_result in results)


def _outputs_at(layout, config_overrides, mcore_dir, input_ids):
    from bridge_convert_ranks import outputs_at

    return outputs_at(layout, mcore_dir, input_ids, config_overrides)


# --- the formats, from their definitions ---------------------------------------------------------
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def test_fp4_dequantisation_low_nibble_first_with_e8m0_scales():
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    exponents = torch.randint(120, 134, (3, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = fp4_pack(codes)
    assert packed.dtype == torch.int8 and packed.shape == (3, 32)
    assert int(packed.view(torch.uint8)[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    fmt = SourceFormat("int8", FP4, "float8_e8m0fnu", (1, 32))
    values = dequantise(packed, exponents.view(E8M0), fmt)
    for r in range(3):
        for c in range(64):
            expected = _e2m1(int(codes[r, c])) * math.ldexp(1.0, int(exponents[r, c // 32]) - 127)
            assert values[r, c].item() == expected


def test_fp8_dequantisation_per_128x128_block():
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(200, 300, generator=g) * 100).to(torch.float8_e4m3fn)
    exponents = torch.randint(110, 140, (2, 3), generator=g, dtype=torch.uint8)
    fmt = SourceFormat("float8_e4m3fn", FP8, "float8_e8m0fnu", (128, 128))
    values = dequantise(weight, exponents.view(E8M0), fmt)
    for r, c in [(0, 0), (127, 129), (128, 127), (199, 299), (150, 257)]:
        expected = float(weight[r, c].float()) * math.ldexp(1.0, int(exponents[r // 128, c // 128]) - 127)
        assert values[r, c].item() == expected


def test_amax_requantisation_alone_is_not_exact_but_keeping_scales_is():
    """A block whose scale is twice its amax scale (its largest value was rounded down)."""
    fmt = SourceFormat("float8_e4m3fn", FP8, "float8_e8m0fnu", (128, 128))
    codes = (torch.randn(128, 128, generator=torch.Generator().manual_seed(3)) * 40).to(torch.float8_e4m3fn)
    scale = torch.tensor([[127 + 3]], dtype=torch.uint8).view(E8M0)
    weight = dequantise(codes, scale, fmt).to(torch.bfloat16)
    amax_stored, amax_scale, _ = requantise(weight, fmt)
    assert not torch.equal(_raw(amax_scale), _raw(scale))
    stored, kept_scale, fresh = requantise(weight, fmt, scale)
    assert fresh == 0
    assert torch.equal(_raw(stored), _raw(codes)) and torch.equal(_raw(kept_scale), _raw(scale))


@pytest.mark.parametrize(("quant", "scale_dtype"), [(FP8, "float8_e8m0fnu"), (FP8, "float32"), (FP4, "float8_e8m0fnu")])
def test_changed_weights_are_quantised_to_the_nearest_value(quant, scale_dtype):
    block = (1, 32) if quant == FP4 else (128, 128)
    fmt = SourceFormat("int8" if quant == FP4 else "float8_e4m3fn", quant, scale_dtype, block)
    g = torch.Generator().manual_seed(4)
    trained = torch.randn(130, 160, generator=g) * 0.05
    original_scale = torch.full((130, 5) if quant == FP4 else (2, 2), 2.0**-20).to(getattr(torch, scale_dtype))
    stored, scale, fresh = requantise(trained, fmt, original_scale)
    assert fresh == original_scale.numel()
    back = dequantise(stored, scale, fmt)
    fmt_max = 6.0 if quant == FP4 else 448.0
    scales = scale.to(torch.float32).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:130, :160]
    amax = trained.abs().reshape(-1)
    # the scale holds the block's amax: the largest value lands within the format's range
    assert ((trained.abs() / scales) <= fmt_max * (1 + 1e-6)).all()
    if scale_dtype == "float8_e8m0fnu":  # and is the smallest power of two that does
        assert ((trained.abs() / scales).amax() > fmt_max / 2)
    # each value is a nearest representable one
    if quant == FP4:
        grid = torch.tensor(E2M1 + [-v for v in E2M1])
    else:
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[torch.isfinite(grid)]
    candidates = grid[None, :] * scales.reshape(-1, 1)
    best = (trained.reshape(-1, 1) - candidates).abs().min(dim=1).values
    assert torch.allclose((back.reshape(-1) - trained.reshape(-1)).abs(), best, rtol=0, atol=1e-12)
    assert amax.numel() == back.numel()


# --- bad inputs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    hf = tmp_path_factory.mktemp("good") / "hf"
    make_tiny_checkpoint(hf, seed=6, quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES)
    return hf


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _first_shard(directory):
    index = json.loads((directory / INDEX_FILE).read_text())
    return directory / sorted(set(index["weight_map"].values()))[0]


def _rewrite(directory, change, holding="embed.weight"):
    """Apply `change(tensors)` to the shard holding tensor `holding` (a dict edited in place)."""
    index = json.loads((directory / INDEX_FILE).read_text())
    shard = directory / index["weight_map"][holding]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (directory / INDEX_FILE).write_text(json.dumps(index))


def _set_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


BAD_INPUTS = {
    "no-such-directory": (lambda d: d / "nowhere", "nowhere"),
    "no-safetensors": (lambda d: [os.remove(p) for p in d.glob("*.safetensors*")] and d, "model.safetensors"),
    "missing-shard": (lambda d: os.remove(_first_shard(d)) or d, "missing"),
    "truncated-file": (lambda d: os.truncate(_first_shard(d), os.path.getsize(_first_shard(d)) // 2) or d,
                       "safetensors"),
    "corrupt-header": (lambda d: [_first_shard(d).write_bytes(b"\xff" * 64), d][-1], "safetensors"),
    "missing-tensor": (lambda d: _rewrite(d, lambda t: t.pop("norm.weight"), "norm.weight") or d, "norm.weight"),
    "extra-tensor": (lambda d: _rewrite(d, lambda t: t.update({"layers.9.attn_norm.weight": torch.ones(64)})) or d,
                     "layers.9.attn_norm.weight"),
    "unknown-naming": (lambda d: _rewrite(d, lambda t: t.update({"encoder.block.0.weight": t.pop("embed.weight")}))
                       or d, "encoder.block.0.weight"),
    "wrong-shape": (lambda d: _rewrite(d, lambda t: t.update({"embed.weight": torch.zeros(128, 60)})) or d,
                    "embed.weight"),
    "wrong-dtype": (lambda d: _rewrite(d, lambda t: t.update({"layers.0.ffn.gate.tid2eid":
                                                             torch.zeros(128, 2)})) or d, "tid2eid"),
    "bad-scale": (lambda d: _rewrite(d, lambda t: t.update({"embed.scale": torch.ones(1, 1)})) or d, "embed"),
    "config-mismatch": (lambda d: _set_config(d, moe_intermediate_size=48) or d, "config does not match"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_naming_it_and_leaves_nothing(good, tmp_path, case, capsys):
    breaker, named = BAD_INPUTS[case]
    hf = breaker(_copy(good, tmp_path / "hf"))
    out = tmp_path / "out"
    assert cli(["import", "--hf", str(hf), "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert named in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_target_is_refused_without_force(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["import", "--hf", str(good), "--out", str(out), "--quiet"]) != 0
    assert "--force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert cli(["import", "--hf", str(good), "--out", str(out), "--quiet", "--force"]) == 0
    assert "keep.txt" not in os.listdir(out) and (out / "metadata.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
