"""Config auto-detection of the bridge: official and transformers flavours, and writing back."""

import dataclasses
import json

import pytest
from transformers import AutoConfig, DeepseekV4Config

from bridge.hf_config import (
    OFFICIAL,
    TRANSFORMERS,
    UnsupportedConfigError,
    YarnScaling,
    official_config_dict,
    read_hf_config,
    transformer_config_kwargs,
    write_official_config,
)
from megatron_v4.config import DeepSeekV4TransformerConfig

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]  # 43 layers + the MTP layer


def flash_official_config() -> dict:
    """DeepSeek-V4-Flash's config.json as shipped on the Hugging Face Hub (deepseek-ai/DeepSeek-V4-Flash)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "expert_dtype": "fp4",
        "hc_eps": 1e-06,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": 512,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "index_head_dim": 128,
        "index_n_heads": 64,
        "index_topk": 512,
        "initializer_range": 0.02,
        "max_position_embeddings": 1048576,
        "model_type": "deepseek_v4",
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 43,
        "num_hash_layers": 3,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": 1,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "q_lora_rank": 1024,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": 128,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "vocab_size": 129280,
        "compress_rope_theta": 160000,
        "compress_ratios": FLASH_RATIOS,
    }


def _architecture(cfg):
    """The fields that describe the model (not where the config came from)."""
    d = dict(vars(cfg))
    for key in ("flavour", "extra", "dtype", "quantization_config", "expert_dtype", "mtp_compress_ratios"):
        d.pop(key)
    return d


def test_official_flavour_is_read_with_the_spec_values():
    cfg = read_hf_config(flash_official_config())
    assert cfg.flavour == OFFICIAL
    assert cfg.compress_ratios == tuple(FLASH_RATIOS[:43])
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (43, 4096, 64, 512)
    assert (cfg.qk_rope_head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank) == (64, 1024, 8, 1024)
    assert (cfg.num_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (256, 6, 2048)
    assert (cfg.num_hash_layers, cfg.num_nextn_predict_layers, cfg.vocab_size) == (3, 1, 129280)
    assert (cfg.rope_theta, cfg.compress_rope_theta) == (10000, 160000)
    assert cfg.yarn == YarnScaling(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)
    assert cfg.quantization_config["weight_block_size"] == [128, 128]
    assert cfg.expert_dtype == "fp4"
    assert cfg.dtype == "bfloat16"


def test_transformers_flavour_from_save_pretrained_matches_the_official_one(tmp_path):
    # transformers' own DeepseekV4Config folds the official keys into its flavour; reading
    # what it saves must give the same architecture as reading the official file.
    official = flash_official_config()
    DeepseekV4Config(**flash_official_config()).save_pretrained(tmp_path)  # it edits the dicts it is given
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in saved and "compress_ratios" not in saved
    cfg = read_hf_config(tmp_path)
    assert cfg.flavour == TRANSFORMERS
    assert _architecture(cfg) == _architecture(read_hf_config(official))


def test_transformers_flavour_from_an_in_memory_config():
    hf = DeepseekV4Config(**flash_official_config())
    cfg = read_hf_config(hf.to_diff_dict())
    assert cfg.flavour == TRANSFORMERS
    assert _architecture(cfg) == _architecture(read_hf_config(flash_official_config()))


def test_transformers_flavour_without_yarn_and_with_other_hash_layers():
    official = flash_official_config()
    del official["rope_scaling"]
    official["num_hash_layers"] = 5
    cfg = read_hf_config(DeepseekV4Config(**official).to_diff_dict())
    assert cfg.yarn is None
    assert cfg.num_hash_layers == 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sliding_window_pattern": 4}, "unsupported key 'sliding_window_pattern'"),
        ({"n_group": 8}, "n_group=8"),
        ({"first_k_dense_replace": 3}, "first_k_dense_replace=3"),
        ({"kv_lora_rank": 512}, "kv_lora_rank=512"),
        ({"rope_scaling": {**flash_official_config()["rope_scaling"], "mscale": 1.0}}, "'mscale' in rope_scaling"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt='e5m2'"),
        ({"quantization_config": {"quant_method": "fp8", "group_size": 32}}, "'group_size' in quantization_config"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
        ({"compress_ratios": FLASH_RATIOS[:40]}, "compress_ratios has 40 entries"),
        ({"compress_ratios": FLASH_RATIOS[:43] + [4]}, "MTP layers"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "'linear'"),
        ({"layer_types": ["sliding_attention"] * 43}, "mixes official keys"),
    ],
)
def test_unsupported_official_configs_name_the_problem(change, message):
    with pytest.raises(UnsupportedConfigError, match=message.replace("[", r"\[")):
        read_hf_config({**flash_official_config(), **change})


def test_unsupported_transformers_configs_name_the_problem():
    saved = DeepseekV4Config(**flash_official_config()).to_diff_dict()
    with pytest.raises(UnsupportedConfigError, match="'sliding_window_pattern'"):
        read_hf_config({**saved, "sliding_window_pattern": 4})
    with pytest.raises(UnsupportedConfigError, match="hash_moe layers must come first"):
        read_hf_config({**saved, "mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * 41})
    with pytest.raises(UnsupportedConfigError, match="attention_factor"):
        compress = {**saved["rope_parameters"]["compress"], "attention_factor": 1.3}
        rope = {**saved["rope_parameters"], "compress": compress}
        read_hf_config({**saved, "rope_parameters": rope})
    with pytest.raises(UnsupportedConfigError, match="neither"):
        read_hf_config({"model_type": "deepseek_v4", "hidden_size": 64})


def test_megatron_config_has_the_spec_values():
    cfg = read_hf_config(flash_official_config())
    mc = DeepSeekV4TransformerConfig(**transformer_config_kwargs(cfg), use_cpu_initialization=True)
    assert (mc.num_layers, mc.hidden_size, mc.num_attention_heads, mc.kv_channels) == (43, 4096, 64, 512)
    assert mc.compress_ratios == FLASH_RATIOS[:43]
    assert (mc.q_lora_rank, mc.qk_rope_head_dim, mc.o_groups, mc.o_lora_rank) == (1024, 64, 8, 1024)
    assert (mc.index_n_heads, mc.index_head_dim, mc.index_topk, mc.sliding_window) == (64, 128, 512, 128)
    assert (mc.rope_theta, mc.compress_rope_theta) == (10000, 160000)
    assert (mc.yarn_factor, mc.yarn_original_max_position_embeddings, mc.yarn_beta_fast, mc.yarn_beta_slow) == (
        16, 65536, 32, 1)
    assert (mc.hc_mult, mc.hc_sinkhorn_iters, mc.hc_eps) == (4, 20, 1e-6)
    assert (mc.num_moe_experts, mc.moe_router_topk, mc.moe_ffn_hidden_size) == (256, 6, 2048)
    assert mc.moe_shared_expert_intermediate_size == 2048
    assert mc.moe_router_topk_scaling_factor == 1.5
    assert mc.moe_router_enable_expert_bias and mc.moe_router_score_function == "sqrtsoftplus"
    assert (mc.num_hash_layers, mc.swiglu_limit, mc.layernorm_epsilon, mc.mtp_num_layers) == (3, 10.0, 1e-6, 1)
    assert mc.vocab_size == 129280


def test_official_config_written_back_reads_the_same_in_the_bridge_and_in_transformers(tmp_path):
    original = read_hf_config(flash_official_config())
    write_official_config(original, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == flash_official_config()
    again = read_hf_config(tmp_path)
    assert again == original
    # and transformers reads it as it reads the shipped one
    ours, shipped = AutoConfig.from_pretrained(tmp_path), DeepseekV4Config(**flash_official_config())
    assert ours.to_diff_dict() == shipped.to_diff_dict()


def test_transformers_flavour_is_written_back_as_official():
    cfg = read_hf_config(DeepseekV4Config(**flash_official_config()).to_diff_dict())
    written = official_config_dict(cfg)
    assert written["compress_ratios"] == FLASH_RATIOS
    assert written["rope_scaling"] == flash_official_config()["rope_scaling"]
    assert written["num_hash_layers"] == 3 and written["qk_rope_head_dim"] == 64


def test_metadata_and_neutral_legacy_keys_are_accepted_and_written_back_in_order():
    harmless = {"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV4Config"}, "_name_or_path": "x",
                "return_dict": True, "output_hidden_states": False, "first_k_dense_replace": 0, "n_group": 1,
                "topk_group": 1, "kv_lora_rank": None}
    cfg = read_hf_config({**flash_official_config(), **harmless})
    assert cfg == dataclasses.replace(read_hf_config(flash_official_config()), extra={**cfg.extra})
    assert list(cfg.extra) == ["architectures", "transformers_version", "use_cache", *harmless]
    assert {k: official_config_dict(cfg)[k] for k in harmless} == harmless


def test_draft_head_keys_and_mtp_ratios_are_carried_unread():
    draft = {"dspark_block_size": 16, "dspark_markov_rank": 256, "num_nextn_predict_layers": 3,
             "compress_ratios": FLASH_RATIOS[:43] + [0, 4, 128]}
    cfg = read_hf_config({**flash_official_config(), **draft})
    assert cfg.has_draft_head and not read_hf_config(flash_official_config()).has_draft_head
    assert cfg.compress_ratios == tuple(FLASH_RATIOS[:43]) and cfg.mtp_compress_ratios == (0, 4, 128)
    written = official_config_dict(cfg)
    assert {k: written[k] for k in draft} == draft


def test_unknown_transformers_rope_parameter_is_refused():
    saved = DeepseekV4Config(**flash_official_config()).to_diff_dict()
    rope = {**saved["rope_parameters"], "main": {**saved["rope_parameters"]["main"], "low_freq_factor": 1}}
    with pytest.raises(UnsupportedConfigError, match="'low_freq_factor' in rope_parameters\\['main'\\]"):
        read_hf_config({**saved, "rope_parameters": rope})
