"""Weight mapping of the bridge: the three Hugging Face namings <-> Megatron-Core.

First on plain state dicts (no model), then through `AutoBridge` and a real `DeepSeekV4Model`,
whose logits are compared with transformers' on the same weights.
"""

import json

import pytest
import torch
from transformers import DeepseekV4ForCausalLM

import megatron_v4
from bridge import AutoBridge
from bridge.conversion_plan import ConversionPlan, RankPosition
from bridge.hf_config import read_hf_config
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE, TRANSFORMERS_SAVED, detect_naming
from bridge.mcore_naming import GROUPED_EXPERTS, MCoreNaming, UnknownTensorError
from bridge.pipeline import dequantise, hf_from_mcore_state_dict, mcore_state_dict_from_hf
from bridge.quantisation import E8M0
from bridge.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint
from bridge.tiny import TINY, make_tiny_checkpoint, make_tiny_model

NAMINGS = (OFFICIAL, TRANSFORMERS_SAVED, TRANSFORMERS_MODULE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {naming: make_tiny_checkpoint(root / naming, naming=naming, seed=3) for naming in NAMINGS}


@pytest.fixture(scope="module")
def reference_model():
    """The transformers model the tiny checkpoints were written from."""
    return make_tiny_model(TINY, seed=3)


def _read(path):
    return dict(SafetensorsCheckpoint(path).items())


def _assert_bit_exact(got, want):
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("naming", NAMINGS)
def test_naming_is_detected_and_round_trips_bit_exact(checkpoints, naming):
    hf = _read(checkpoints[naming])
    assert detect_naming(hf) == naming
    mcore = mcore_state_dict_from_hf(hf)
    assert "decoder.layers.1.self_attention.indexer.compressor.linear_kv.weight" in mcore
    assert "decoder.layers.0.mlp.router.tid2eid" in mcore and "decoder.layers.2.mlp.router.expert_bias" in mcore
    _assert_bit_exact(hf_from_mcore_state_dict(mcore, naming=naming), hf)


def test_transformers_saved_names_are_what_save_pretrained_writes(checkpoints):
    names = set(SafetensorsCheckpoint(checkpoints[TRANSFORMERS_SAVED]).names())
    # written by transformers itself (tiny.py calls save_pretrained), read by our table
    assert {"model.embed_tokens.weight", "head.weight", "model.norm.weight", "model.hc_head.hc_fn"} <= names
    assert "model.layers.0.attn.norm.weight" in names and "model.layers.1.attn.compressor.norm.weight" in names


def test_official_checkpoint_loads_in_transformers_unchanged(checkpoints, reference_model):
    # transformers' own conversion mapping reads the official names: every tensor must land where it came from
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(checkpoints[OFFICIAL], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_bit_exact(loaded.state_dict(), reference_model.state_dict())


def test_official_checkpoint_has_mtp_and_it_round_trips(checkpoints):
    hf = _read(checkpoints[OFFICIAL])
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
            "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias"} <= set(hf)
    mcore = mcore_state_dict_from_hf(hf)
    assert torch.equal(mcore["mtp.layers.0.e_proj.weight"], hf["mtp.0.e_proj.weight"])
    assert torch.equal(mcore["mtp.layers.0.hc_head.fn"], hf["mtp.0.hc_head_fn"])
    assert torch.equal(mcore["mtp.layers.0.final_layernorm.weight"], hf["mtp.0.norm.weight"])
    assert torch.equal(mcore["mtp.layers.0.transformer_layer.mlp.router.expert_bias"], hf["mtp.0.ffn.gate.bias"])
    assert "mtp.layers.0.transformer_layer.self_attention.compressor.ape" not in mcore
    for naming in NAMINGS:  # every naming carries MTP under the official names
        _assert_bit_exact(
            {k: v for k, v in hf_from_mcore_state_dict(mcore, naming=naming).items() if k.startswith("mtp.")},
            {k: v for k, v in hf.items() if k.startswith("mtp.")},
        )


def test_megatron_tensors_follow_the_contract(checkpoints):
    hf = _read(checkpoints[OFFICIAL])
    mcore = mcore_state_dict_from_hf(hf)
    for e in range(TINY.num_routed_experts):
        fc1 = mcore[f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([hf[f"layers.2.ffn.experts.{e}.w1.weight"],
                                           hf[f"layers.2.ffn.experts.{e}.w3.weight"]]))
    assert torch.equal(mcore["decoder.layers.3.mlp.shared_experts.linear_fc1.weight"],
                       torch.cat([hf["layers.3.ffn.shared_experts.w1.weight"],
                                  hf["layers.3.ffn.shared_experts.w3.weight"]]))
    pairs = {
        "embedding.word_embeddings.weight": "embed.weight",
        "output_layer.weight": "head.weight",
        "decoder.final_layernorm.weight": "norm.weight",
        "decoder.hc_head.scale": "hc_head_scale",
        "decoder.layers.1.hc_ffn.base": "layers.1.hc_ffn_base",
        "decoder.layers.1.self_attention.attn_sink": "layers.1.attn.attn_sink",
        "decoder.layers.1.self_attention.linear_o_down_proj.weight": "layers.1.attn.wo_a.weight",
        "decoder.layers.1.self_attention.linear_proj.weight": "layers.1.attn.wo_b.weight",
        "decoder.layers.1.self_attention.indexer.linear_weights_proj.weight":
            "layers.1.attn.indexer.weights_proj.weight",
        "decoder.layers.1.self_attention.indexer.compressor.ape": "layers.1.attn.indexer.compressor.ape",
        "decoder.layers.2.self_attention.compressor.norm.weight": "layers.2.attn.compressor.norm.weight",
        "decoder.layers.0.mlp.router.tid2eid": "layers.0.ffn.gate.tid2eid",
    }
    for mcore_name, official in pairs.items():
        assert torch.equal(mcore[mcore_name], hf[official]), mcore_name
    assert mcore["decoder.layers.0.mlp.router.tid2eid"].dtype == torch.int64
    assert not any("indexer" in n for n in mcore if n.startswith("decoder.layers.2."))  # HCA has no indexer


def test_stacked_transformers_experts_split_into_megatron_experts(reference_model):
    state = reference_model.state_dict()
    mcore = mcore_state_dict_from_hf(state)
    gate_up, down = state["model.layers.3.mlp.experts.gate_up_proj"], state["model.layers.3.mlp.experts.down_proj"]
    for e in range(TINY.num_routed_experts):
        assert torch.equal(mcore[f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc1.weight"], gate_up[e])
        assert torch.equal(mcore[f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc2.weight"], down[e])
    _assert_bit_exact(hf_from_mcore_state_dict(mcore, naming=TRANSFORMERS_MODULE), dict(state))


def test_grouped_expert_form_round_trips(checkpoints):
    hf = _read(checkpoints[OFFICIAL])
    mcore = mcore_state_dict_from_hf(hf, expert_form=GROUPED_EXPERTS)
    assert torch.equal(mcore["decoder.layers.1.mlp.experts.linear_fc2.weight3"], hf["layers.1.ffn.experts.3.w2.weight"])
    assert not any("local_experts" in n for n in mcore)
    _assert_bit_exact(hf_from_mcore_state_dict(mcore), hf)


def test_sharded_checkpoint_reads_like_a_single_file(tmp_path, checkpoints):
    single = _read(checkpoints[OFFICIAL])
    total = sum(t.numel() * t.element_size() for t in single.values())
    make_tiny_checkpoint(tmp_path, naming=OFFICIAL, seed=3, max_shard_bytes=total // 2 + 1)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and not (tmp_path / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == total
    checkpoint = SafetensorsCheckpoint(tmp_path)
    sharded = dict(checkpoint.items())
    _assert_bit_exact(sharded, single)
    assert torch.equal(checkpoint.get("layers.3.attn.wo_b.weight"), single["layers.3.attn.wo_b.weight"])
    _assert_bit_exact(hf_from_mcore_state_dict(mcore_state_dict_from_hf(sharded)), single)


def test_unknown_tensors_are_named():
    hf = {"embed.weight": torch.zeros(2, 2), "layers.0.attn.wq_c.weight": torch.zeros(2, 2)}
    with pytest.raises(UnknownTensorError, match="layers.0.attn.wq_c.weight"):
        detect_naming(hf)
    with pytest.raises(UnknownTensorError, match="layers.0.attn.wq_c.weight"):
        mcore_state_dict_from_hf(hf, naming=OFFICIAL)
    with pytest.raises(UnknownTensorError, match="decoder.layers.0.self_attention.linear_qkv.weight"):
        hf_from_mcore_state_dict({"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(2, 2)})


def test_missing_fusion_partner_is_named():
    with pytest.raises(KeyError, match="layers.0.ffn.shared_experts.w3.weight"):
        mcore_state_dict_from_hf({"layers.0.ffn.shared_experts.w1.weight": torch.zeros(2, 2)}, naming=OFFICIAL)


def test_dequantise_step_pairs_scales_and_gives_the_values():
    # FP8: W = fp8 * scale per 2x2 block (E8M0 2^(e-127)); the scale may come before its weight
    codes = torch.tensor([[1.0, -2.0, 0.5, 4.0], [3.0, 1.5, -1.0, 2.0]]).to(torch.float8_e4m3fn)
    exponents = torch.tensor([[127 + 1, 127 - 2]], dtype=torch.uint8)
    plain = torch.randn(4, 4)
    items = [("layers.0.attn.wq_a.scale", exponents.view(E8M0)), ("layers.0.attn.wq_b.weight", plain),
             ("layers.0.attn.wq_a.weight", codes)]
    got = dict(dequantise(items, fp8_block=(2, 2)))
    assert sorted(got) == ["layers.0.attn.wq_a.weight", "layers.0.attn.wq_b.weight"]
    assert got["layers.0.attn.wq_b.weight"] is plain
    want = codes.float() * torch.tensor([[2.0, 2.0, 0.25, 0.25]] * 2)
    assert got["layers.0.attn.wq_a.weight"].dtype == torch.float32
    assert torch.equal(got["layers.0.attn.wq_a.weight"], want)
    # FP4: two e2m1 codes per byte, low nibble first, an E8M0 scale per 32 inputs of a row
    packed = torch.tensor([[0x21] * 16], dtype=torch.uint8).view(torch.int8)  # codes 1 (0.5) then 2 (1.0)
    scale = torch.tensor([[127 + 3]], dtype=torch.uint8).view(E8M0)
    (name, values), = dequantise([("layers.0.ffn.experts.0.w1.weight", packed),
                                  ("layers.0.ffn.experts.0.w1.scale", scale)])
    assert name == "layers.0.ffn.experts.0.w1.weight"
    assert torch.equal(values, torch.tensor([[4.0, 8.0] * 16]))
    with pytest.raises(ValueError, match="layers.0.attn.wq_a.scale"):
        list(dequantise([("layers.0.attn.wq_a.weight", codes)]))


def test_shard_step_splits_by_the_rules():
    # formulas of the Megatron layout: GLU halves split separately, row-parallel on dim 1, experts by EP
    w1, w3, w2 = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)
    q_up, sink = torch.randn(12, 5), torch.randn(4)
    full = {
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": torch.cat([w1, w3]),
        "decoder.layers.0.mlp.shared_experts.linear_fc2.weight": w2,
        "decoder.layers.0.self_attention.linear_q_up_proj.weight": q_up,
        "decoder.layers.0.self_attention.attn_sink": sink,
        "decoder.layers.0.self_attention.linear_kv.weight": torch.randn(3, 5),
        **{f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight": torch.full((2, 2), float(e))
           for e in range(4)},
    }
    ranks = RankPosition(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)
    got = dict(_shard(full, ConversionPlan(), num_experts=4, ranks=ranks))
    assert torch.equal(got["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"], torch.cat([w1[4:], w3[4:]]))
    assert torch.equal(got["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"], w2[:, 4:])
    assert torch.equal(got["decoder.layers.0.self_attention.linear_q_up_proj.weight"], q_up[6:])
    assert torch.equal(got["decoder.layers.0.self_attention.attn_sink"], sink[2:])
    assert torch.equal(got["decoder.layers.0.self_attention.linear_kv.weight"],
                       full["decoder.layers.0.self_attention.linear_kv.weight"])
    experts = {n: t for n, t in got.items() if "local_experts" in n}
    assert sorted(experts) == [f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight" for e in (0, 1)]
    assert experts["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"][0, 0] == 2.0


def _shard(full, plan, num_experts, ranks):
    """A rank's tensors, local names and shares, as the conversion plan gives them."""
    per_rank = num_experts // ranks.ep_size
    for name, tensor in full.items():
        tensor_plan = plan.tensor(name)
        if tensor_plan.sharding.by_expert:
            owner, local = divmod(tensor_plan.match.values["expert"], per_rank)
            if owner != ranks.ep_rank:
                continue
            name = plan.renumbered(tensor_plan, expert=local).mcore
        yield name, tensor_plan.share(ranks).of(tensor, name)


# --- through AutoBridge and the Megatron-Core model -----------------------------------------------
@pytest.fixture(scope="module")
def single_rank():
    layout = megatron_v4.initialize()
    yield layout
    megatron_v4.destroy()


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


@pytest.fixture(scope="module")
def token_ids():
    # 140 tokens: past the sliding window (8), several CSA windows (4) and one complete HCA window (128)
    return torch.randint(0, TINY.vocab_size, (2, 140), generator=torch.Generator().manual_seed(0))


def test_megatron_model_round_trip_and_logits_match_transformers(single_rank, checkpoints, reference_model, token_ids):
    bridge = AutoBridge.from_hf_pretrained(checkpoints[OFFICIAL])
    assert bridge.naming == OFFICIAL and bridge.mtp_num_layers == 1
    (model,) = bridge.to_megatron_model(dtype=torch.float32)
    assert model.mtp_process
    _assert_bit_exact(dict(bridge.export_hf_weights([model])), _read(checkpoints[OFFICIAL]))
    got, want = _logits(model, token_ids), _logits(reference_model, token_ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("naming", [TRANSFORMERS_SAVED, TRANSFORMERS_MODULE])
def test_transformers_namings_load_the_same_model(single_rank, checkpoints, reference_model, naming, token_ids):
    bridge = AutoBridge.from_hf_pretrained(checkpoints[naming])
    assert bridge.naming == naming and bridge.mtp_num_layers == 0  # transformers writes no MTP tensors
    (model,) = bridge.to_megatron_model(dtype=torch.float32)
    assert not model.mtp_process
    official = {k: v for k, v in _read(checkpoints[OFFICIAL]).items() if not k.startswith("mtp.")}
    _assert_bit_exact(dict(bridge.export_hf_weights(model)), official)
    _assert_bit_exact(dict(bridge.export_hf_weights(model, naming=naming)), _read(checkpoints[naming]))
    torch.testing.assert_close(_logits(model, token_ids), _logits(reference_model, token_ids).logits, rtol=0, atol=1e-4)


def test_bridge_from_an_in_memory_transformers_model(single_rank, reference_model, token_ids):
    bridge = AutoBridge.from_hf_pretrained(reference_model)
    assert bridge.naming == TRANSFORMERS_MODULE
    model = bridge.to_megatron_model(dtype=torch.float32)
    _assert_bit_exact(dict(bridge.export_hf_weights(model, naming=TRANSFORMERS_MODULE)),
                      dict(reference_model.state_dict()))
    torch.testing.assert_close(_logits(model[0], token_ids), _logits(reference_model, token_ids).logits,
                               rtol=0, atol=1e-4)


def test_saved_checkpoint_is_official_and_loads_in_transformers(single_rank, checkpoints, reference_model, tmp_path):
    bridge = AutoBridge.from_hf_pretrained(checkpoints[OFFICIAL])
    model = bridge.to_megatron_model(dtype=torch.float32)
    bridge.save_hf_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["compress_ratios"] == [0, 4, 128, 4, 0] and config["num_hash_layers"] == 2
    assert read_hf_config(tmp_path) == read_hf_config(checkpoints[OFFICIAL])
    _assert_bit_exact(_read(tmp_path), _read(checkpoints[OFFICIAL]))
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_bit_exact(loaded.state_dict(), reference_model.state_dict())


def test_bf16_model_gets_the_checkpoint_rounded_to_bf16(single_rank, checkpoints):
    bridge = AutoBridge.from_hf_pretrained(checkpoints[OFFICIAL])
    (model,) = bridge.to_megatron_model()  # bf16 by default
    source = _read(checkpoints[OFFICIAL])
    exported = dict(bridge.export_hf_weights(model))
    weight = "layers.1.attn.wq_b.weight"
    assert model.decoder.layers[1].self_attention.linear_q_up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(exported[weight].float(), source[weight].to(torch.bfloat16).float())
    assert torch.equal(exported["layers.0.ffn.gate.tid2eid"], source["layers.0.ffn.gate.tid2eid"])


def test_sharding_rules_agree_with_the_models_parallel_layers(single_rank, checkpoints):
    # the model's own tensor-parallel attributes (set by Megatron-Core's parallel linears) are the reference
    bridge = AutoBridge.from_hf_pretrained(checkpoints[OFFICIAL])
    (model,) = bridge.to_megatron_model(dtype=torch.float32, load_weights=False)
    naming = MCoreNaming()
    modules = dict(model.named_modules())
    checked = 0
    for name, param in model.named_parameters():
        sharding = naming.from_mcore(name).rule.sharding
        split_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        is_expert = getattr(modules[name.rpartition(".")[0]], "is_expert", False)
        assert (sharding.dim, sharding.by_expert) == (split_dim, is_expert), name
        checked += sharding.dim is not None
    assert checked > 20
    parameters = dict(model.named_parameters())
    buffers = [n for n, t in model.state_dict().items() if n not in parameters and t is not None]
    assert any(n.endswith("tid2eid") for n in buffers) and any(n.endswith("expert_bias") for n in buffers)
    for name in buffers:  # router tables and biases are replicated
        assert naming.from_mcore(name).rule.sharding.dim is None, name
