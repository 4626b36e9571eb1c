"""`python -m bridge slice`: a smaller DeepSeek-V4 cut out of a bigger one.

Checked, with the expected cuts written here independently of bridge/slicing.py:
- the identity slice of a quantised checkpoint gives back every byte, every tensor COPY;
- a layer- and expert-only slice has the logits of a transformers model of the small config loaded
  from the big one's kept layers and experts (fp32, 1e-5), and its hash tables keep each kept
  expert's tokens and spread the dropped experts' tokens evenly; a transformers-named source slices
  to the same tensors as the official one;
- a head/dim slice: each tensor is its documented cut (whole heads and groups, RoPE on the last
  qk_rope_head_dim channels, compressors per overlap half), and it loads through the bridge at TP2/EP2
  with transformers' logits;
- sliced from a trained big model, the small model starts at a loss well below a random init's;
- configs that cannot be sliced fail with one line and leave no output.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bridge.cli import main as cli
from bridge.hf_config import transformers_config, write_official_config
from bridge.hf_naming import TRANSFORMERS_MODULE, TRANSFORMERS_SAVED, TRANSLATORS
from bridge.safetensors_io import SafetensorsCheckpoint, write_safetensors
from bridge.tiny import TINY, make_tiny_checkpoint, make_tiny_model, tiny_config
from megatron_v4.runtime.ranks import run_on_ranks

pytestmark = pytest.mark.timeout(600)

ROPE = TINY.qk_rope_head_dim


def _config_file(cfg, directory) -> str:
    return write_official_config(cfg, directory)


def _slice(tmp, src, cfg, *extra) -> str:
    out = os.path.join(tmp, "slice")
    code = cli(["slice", "--hf", str(src), "--config", _config_file(cfg, os.path.join(tmp, "cfg")),
                "--out", out, "--quiet", *extra])
    assert code == 0
    return out


def _tensors(directory) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(directory)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


def _provenance(directory) -> dict:
    with open(os.path.join(directory, "provenance.json")) as f:
        return json.load(f)


def _top_experts(gate: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(gate.norm(dim=1), count).indices.tolist())


# --- identity ----------------------------------------------------------------------------------------
def test_identity_slice_gives_back_every_byte(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path / "big", quantised=True, fp8_block=(16, 16))
    out = _slice(tmp_path, src, TINY, "--dtype", "source")
    assert "203 COPY, 0 SLICE, 0 INIT" in capsys.readouterr().out
    source, sliced = _tensors(src), _tensors(out)
    assert sorted(source) == sorted(sliced)
    for name, tensor in source.items():
        assert sliced[name].dtype == tensor.dtype and torch.equal(sliced[name].view(torch.uint8),
                                                                  tensor.view(torch.uint8)), name
    provenance = _provenance(out)
    weights = [n for n in source if not n.endswith(".scale")]
    assert {n: e["kind"] for n, e in provenance["tensors"].items()} == {n: "COPY" for n in weights}
    with open(os.path.join(out, "frozen_keys.json")) as f:
        assert json.load(f) == sorted(weights)


# --- layers and experts ----------------------------------------------------------------------------------
DEEP = tiny_config(num_layers=8, compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0), num_routed_experts=8,
                   num_hash_layers=2)
SHALLOW = tiny_config(num_layers=4, compress_ratios=(0, 4, 128, 0), num_routed_experts=4, num_hash_layers=1)
STRIDE = [0, 2, 5, 7]  # round(i * 7 / 3)


def _small_from_big(big_state: dict, layers: list[int], experts: dict[int, list[int]]) -> dict:
    """The small model's transformers state dict: kept layers renumbered, kept experts' rows."""
    small = {}
    for name, tensor in big_state.items():
        if not name.startswith("model.layers."):
            small[name] = tensor
            continue
        layer = int(name.split(".")[2])
        if layer not in layers:
            continue
        rest = name.split(".", 3)[3]
        if rest.startswith(("mlp.experts.", "mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            tensor = tensor[experts[layer]]
        small[f"model.layers.{layers.index(layer)}.{rest}"] = tensor
    return small


def test_layer_and_expert_slice_has_the_kept_models_logits(tmp_path, capsys):
    from transformers import DeepseekV4ForCausalLM

    from bridge.convert import hf_reference_model

    src = make_tiny_checkpoint(tmp_path / "big", cfg=DEEP, seed=3)
    out = _slice(tmp_path, src, SHALLOW, "--dtype", "source")
    print(capsys.readouterr().out)
    big = make_tiny_model(DEEP, seed=3).state_dict()
    experts = {n: _top_experts(big[f"model.layers.{n}.mlp.gate.weight"], 4) for n in STRIDE}
    provenance = _provenance(out)
    assert [provenance["blocks"][f"layers.{i}"]["source"] for i in range(4)] == [f"layers.{n}" for n in STRIDE]
    assert provenance["blocks"]["layers.1"]["experts"] == experts[2]

    sliced = _tensors(out)
    table = sliced["layers.0.ffn.gate.tid2eid"]
    source_table = big["model.layers.0.mlp.gate.tid2eid"]
    kept = experts[0]
    for token in range(DEEP.vocab_size):
        assert len(set(table[token].tolist())) == 2
        for j, e in enumerate(source_table[token].tolist()):
            if e in kept:
                assert table[token, j] == kept.index(e)
    loads = torch.bincount(table.reshape(-1), minlength=4)
    print("hash loads after the remap:", loads.tolist())
    assert loads.max() - loads.min() <= 1

    expected = _small_from_big(big, STRIDE, experts)
    expected["model.layers.0.mlp.gate.tid2eid"] = table
    reference = DeepseekV4ForCausalLM(transformers_config(SHALLOW)).eval()
    reference.load_state_dict(expected, strict=True)
    ids = torch.randint(0, DEEP.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = hf_reference_model(out)(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # SLICE: gate.weight of the 4 layers and the MTP layer, gate.bias of the 3 learned-routing layers and the
    # MTP layer, layer 0's hash table; everything else is a kept tensor whole
    assert provenance["counts"] == {"COPY": 183, "SLICE": 10, "INIT": 0}, provenance["counts"]


def test_a_layer_that_changes_routing_kind_gets_init_tensors(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "big", cfg=DEEP, seed=3, with_mtp=False)
    chosen = {f"layers.{n}": [7, 5, 3, 1] for n in STRIDE}
    (tmp_path / "experts.json").write_text(json.dumps(chosen))
    out = _slice(tmp_path, src, tiny_config(**{**SHALLOW.__dict__, "num_hash_layers": 2}),
                 "--experts", str(tmp_path / "experts.json"))
    assert _provenance(out)["blocks"]["layers.3"] == {"source": "layers.7", "experts": [7, 5, 3, 1]}
    provenance = _provenance(out)["tensors"]
    assert provenance["layers.3.ffn.experts.0.w2.weight"]["source"] == "layers.7.ffn.experts.7.w2.weight"
    assert provenance["layers.1.ffn.gate.tid2eid"]["kind"] == "INIT"  # source layer 2 learns its routing
    assert "layers.1.ffn.gate.bias" not in provenance
    table = _tensors(out)["layers.1.ffn.gate.tid2eid"]
    assert table.shape == (DEEP.vocab_size, 2) and all(len(set(row)) == 2 for row in table.tolist())


@pytest.mark.parametrize("naming", [TRANSFORMERS_MODULE, TRANSFORMERS_SAVED])
def test_transformers_namings_slice_like_the_official_one(tmp_path, naming):
    official = make_tiny_checkpoint(tmp_path / "official", cfg=DEEP, seed=3, with_mtp=False)
    theirs = make_tiny_checkpoint(tmp_path / naming, naming=naming, cfg=DEEP, seed=3, with_mtp=False)
    a = _tensors(_slice(tmp_path / "a", official, SHALLOW, "--dtype", "source"))
    b = _tensors(_slice(tmp_path / "b", theirs, SHALLOW, "--dtype", "source"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


# --- heads and dims ----------------------------------------------------------------------------------------
WIDE = tiny_config(index_head_dim=24)
NARROW = tiny_config(hidden_size=48, num_attention_heads=2, o_groups=2, head_dim=24, q_lora_rank=24,
                     o_lora_rank=8, index_n_heads=8, index_head_dim=20, moe_intermediate_size=16,
                     num_routed_experts=2)
KEPT_HEADS = [0, 2]  # the first head of each of the 2 groups (2 heads per group in the source)


def _head(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last dim, a head's channels, cut to `width`: its first width - rope and its last rope channels."""
    return torch.cat([x[..., : width - ROPE], x[..., x.shape[-1] - ROPE:]], dim=-1)


def _rows_per_head(w: torch.Tensor, heads, head_dim: int, width: int) -> torch.Tensor:
    """Rows [heads * head_dim, cols]: the given heads, each cut to `width` channels."""
    per_head = w.view(-1, head_dim, w.shape[1])[heads].transpose(1, 2)
    return _head(per_head, width).transpose(1, 2).reshape(-1, w.shape[1])


def _expected_cut(name: str, w: torch.Tensor, experts: list[int]) -> torch.Tensor:
    s, n = NARROW, WIDE
    d, q, c, ic = s.hidden_size, s.q_lora_rank, s.head_dim, s.index_head_dim
    suffix = name.split(".", 2)[-1] if name.startswith(("layers.", "mtp.")) else name
    overlap = 2 if w.dim() == 2 and w.shape[0] in (2 * n.head_dim, 2 * n.index_head_dim) else 1
    if suffix in ("embed.weight", "head.weight"):
        return w[:, :d]
    if suffix.endswith("_fn"):
        return w.view(w.shape[0], n.hc_mult, n.hidden_size)[:, :, :d].reshape(w.shape[0], -1)
    if suffix.endswith(("_base", "_scale")):
        return w
    if suffix.endswith(("norm.weight",)) and "compressor" not in suffix and suffix not in (
            "attn.q_norm.weight", "attn.kv_norm.weight"):
        return w[:d]
    if suffix == "attn.q_norm.weight":
        return w[:q]
    if suffix == "attn.wq_a.weight":
        return w[:q, :d]
    if suffix == "attn.wq_b.weight":
        return _rows_per_head(w, KEPT_HEADS, n.head_dim, c)[:, :q]
    if suffix == "attn.attn_sink":
        return w[KEPT_HEADS]
    if suffix in ("attn.wkv.weight", "attn.kv_norm.weight", "attn.compressor.norm.weight"):
        return _head(w.T, c).T[..., :d] if w.dim() == 2 else _head(w, c)
    if suffix == "attn.wo_a.weight":  # [G*R, (H/G)*c]: both groups, first R' rows, first head of each
        per_group = w.view(n.o_groups, n.o_lora_rank, n.num_attention_heads // n.o_groups, n.head_dim)
        return _head(per_group[:, : s.o_lora_rank, :1], c).reshape(s.o_groups * s.o_lora_rank, c)
    if suffix == "attn.wo_b.weight":
        return w.view(n.hidden_size, n.o_groups, n.o_lora_rank)[:d, :, : s.o_lora_rank].reshape(d, -1)
    if suffix in ("attn.compressor.wkv.weight", "attn.compressor.wgate.weight"):
        return _rows_per_head(w, list(range(overlap)), n.head_dim, c)[:, :d]
    if suffix == "attn.compressor.ape":
        return _head(w.view(w.shape[0], -1, n.head_dim), c).reshape(w.shape[0], -1)
    if suffix == "attn.indexer.wq_b.weight":
        return _rows_per_head(w, list(range(s.index_n_heads)), n.index_head_dim, ic)[:, :q]
    if suffix == "attn.indexer.weights_proj.weight":
        return w[: s.index_n_heads, :d]
    if suffix in ("attn.indexer.compressor.wkv.weight", "attn.indexer.compressor.wgate.weight"):
        return _rows_per_head(w, list(range(overlap)), n.index_head_dim, ic)[:, :d]
    if suffix == "attn.indexer.compressor.ape":
        return _head(w.view(w.shape[0], -1, n.index_head_dim), ic).reshape(w.shape[0], -1)
    if suffix == "attn.indexer.compressor.norm.weight":
        return _head(w, ic)
    if suffix == "ffn.gate.weight":
        return w[experts, :d]
    if suffix == "ffn.gate.bias":
        return w[experts]
    if suffix == "ffn.gate.tid2eid":
        return None  # checked by the remap test
    if suffix.endswith(("w1.weight", "w3.weight")):
        return w[: s.moe_intermediate_size, :d]
    if suffix.endswith("w2.weight"):
        return w[:d, : s.moe_intermediate_size]
    if suffix in ("e_proj.weight", "h_proj.weight"):
        return w[:d, :d]
    raise AssertionError(f"the test has no expected cut for {name}")


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    root = tmp_path_factory.mktemp("narrow")
    src = make_tiny_checkpoint(root / "big", cfg=WIDE, seed=4)
    return src, _slice(root, src, NARROW, "--dtype", "source")


def test_head_and_dim_slice_is_the_documented_cut_of_each_tensor(narrow):
    src, out = narrow
    source, sliced = _tensors(src), _tensors(out)
    provenance = _provenance(out)
    print("COPY/SLICE/INIT:", provenance["counts"])
    checked = 0
    for name, got in sliced.items():
        entry = provenance["tensors"][name]
        block = name.split(".ffn.")[0] + "." if ".ffn." in name else ""
        experts = provenance["blocks"][block.rstrip(".")]["experts"] if block else []
        if ".ffn.experts." in name:
            e = int(name.split(".")[4])
            assert entry["source"] == name.replace(f"experts.{e}.", f"experts.{experts[e]}.")
        if block:
            assert experts == _top_experts(source[block + "ffn.gate.weight"].float(), NARROW.num_routed_experts)
        expected = _expected_cut(name, source[entry["source"]], experts)
        if expected is None:
            continue
        assert got.shape == expected.shape and torch.equal(got, expected), name
        checked += 1
    assert checked == len(sliced) - 2  # all but the two hash tables
    rope_tail = provenance["tensors"]["layers.0.attn.wkv.weight"]["index"][0]
    assert rope_tail == [[0, 8], [16, 32]]  # 8 non-rope channels, then the 16 rope ones at the tail


def test_quantised_source_slices_to_bf16_from_its_dequantised_values(tmp_path):
    from bridge.hf_source import HFSource

    src = make_tiny_checkpoint(tmp_path / "big", cfg=WIDE, seed=4, quantised=True, fp8_block=(16, 16))
    out = _slice(tmp_path, src, NARROW)
    source, sliced = HFSource(src), HFSource(out)
    provenance = _provenance(out)
    for name in sliced.names():
        entry = provenance["tensors"][name]
        block = name.split(".ffn.")[0] if ".ffn." in name else ""
        expected = _expected_cut(name, source.read(entry["source"])[0],
                                 provenance["blocks"][block]["experts"] if block else [])
        if expected is not None:
            assert torch.equal(sliced.read(name)[0], expected.to(sliced.read(name)[0].dtype)), name
    assert sliced.tensors["layers.0.attn.wq_b.weight"].format.dtype == "bfloat16"
    assert sliced.tensors["layers.0.attn.attn_sink"].format.dtype == "float32"
    code = cli(["slice", "--hf", str(src), "--config", str(tmp_path / "cfg" / "config.json"),
                "--out", str(tmp_path / "fp4"), "--dtype", "source", "--quiet"])
    assert code == 1 and not os.path.exists(tmp_path / "fp4")  # 48 expert inputs: not a whole FP4 group


def test_head_and_dim_slice_runs_through_the_bridge_at_tp2_ep2(narrow, tmp_path):
    from bridge import convert

    _, out = narrow
    mcore = tmp_path / "mcore"
    convert.import_checkpoint(out, mcore, torch.float32, progress=False)
    ids = torch.randint(0, NARROW.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = convert.hf_reference_model(out)(input_ids=ids).logits
    results = run_on_ranks(_outputs_at, 2, {"tp": 2, "ep": 2}, str(mcore), ids, timeout=300)
    for result in results:
        diff = (result["logits"] - want).abs().max()
        print(f"TP2/EP2 logits vs transformers: max |diff| {diff:.3g} of max |logit| {want.abs().max():.3g}")
        assert diff <= 1e-4 * want.abs().max()


def _outputs_at(layout, mcore_dir, input_ids):
    from bridge_convert_ranks import outputs_at

    return outputs_at(layout, mcore_dir, input_ids, {})


# --- warm start -----------------------------------------------------------------------------------------------
TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "a slice keeps what the big model learned. ") * 40


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_slice_of_a_trained_model_starts_below_a_random_init(tmp_path):
    from transformers import DeepseekV4ForCausalLM

    from bridge.convert import hf_reference_model

    big_cfg = tiny_config(num_layers=6, compress_ratios=(0, 4, 128, 4, 128, 0), num_routed_experts=8)
    small_cfg = tiny_config(num_layers=4, compress_ratios=(0, 128, 4, 0), num_routed_experts=4,
                            moe_intermediate_size=16)
    tokens = torch.tensor(list(TEXT.encode()))  # ASCII: below the vocab of 128
    windows = tokens[: len(tokens) // 64 * 64].view(-1, 64)
    torch.manual_seed(0)
    big = DeepseekV4ForCausalLM(transformers_config(big_cfg))
    big.model.layers[0].mlp.gate.tid2eid.copy_(torch.arange(128 * 2).view(128, 2) % 8)
    optimizer = torch.optim.AdamW(big.parameters(), lr=3e-3)
    for step in range(50):
        batch = windows[torch.randint(0, len(windows), (8,))]
        loss = big(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    big.eval()
    official = dict(TRANSLATORS[TRANSFORMERS_MODULE].to_official(big.state_dict().items()))
    write_official_config(big_cfg, tmp_path / "big")
    write_safetensors(official.items(), tmp_path / "big")
    out = _slice(tmp_path, tmp_path / "big", small_cfg, "--dtype", "source")  # layers 0, 2, 3, 5

    random_init = DeepseekV4ForCausalLM(transformers_config(small_cfg)).eval()
    trained, sliced, fresh = _loss(big, windows), _loss(hf_reference_model(out), windows), _loss(random_init, windows)
    print(f"loss on the big model's text: big (trained) {trained:.3f}, slice {sliced:.3f}, random init {fresh:.3f}")
    assert sliced < fresh - 1.0


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 96}, "hidden_size=96 is larger than the source's 64"),
    ({"qk_rope_head_dim": 8}, "qk_rope_head_dim=8 differs from the source's 16"),
    ({"head_dim": 12, "qk_rope_head_dim": 16}, "head_dim=12 cannot hold the 16 RoPE dims"),
    ({"num_layers": 2, "compress_ratios": (0, 128)}, "set compress_ratios to [0, 4, 0]"),
    ({"num_attention_heads": 4, "o_groups": 1}, "4 heads per output group"),
])
def test_unsliceable_configs_fail_with_one_line(tmp_path, capsys, changes, message):
    src = make_tiny_checkpoint(tmp_path / "big")
    code = cli(["slice", "--hf", str(src), "--config", _config_file(tiny_config(**changes), tmp_path / "cfg"),
                "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")
