"""DeepSeekV4Model against transformers' DeepseekV4ForCausalLM (float32, CPU, one rank).

Random tiny transformers models (every bias, hc parameter, attention sink and
ape made non-trivial) are copied into our model through an explicit map from
transformers' in-memory names to the Megatron-Core names of the contract;
logits, loss and every parameter's gradient are compared. The bfloat16 test
compares our error to transformers' own bf16 error, and the MTP test checks
the MTP logits and loss against a formula-level reference of spec section 5.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import megatron_v4
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.model import DeepSeekV4Model
from megatron_v4.specs import get_dsv4_decoder_block_spec, get_dsv4_mtp_block_spec

pytestmark = pytest.mark.timeout(300)


@dataclasses.dataclass
class TinyConfig:
    name: str
    compress_ratios: list[int]
    num_hash_layers: int
    num_attention_heads: int = 4
    num_experts: int = 4
    o_groups: int = 2
    yarn: bool = False
    swiglu_limit: float = 10.0
    routed_scaling_factor: float = 1.5
    seq_lens: tuple[int, ...] = ()


WINDOW = 8
CONFIGS = [
    # ratio 0 / 4 / 128, hash on layer 0 only, plain compress rope
    TinyConfig("sliding-csa-hca", [0, 4, 128], 1, seq_lens=(1, 3, 4, 5, 7, 8, 9, 260)),
    # CSA twice with YaRN on the compressed layers, a tight SwiGLU clamp, 8 heads, 8 experts
    TinyConfig(
        "csa-yarn-clamp",
        [4, 0, 4, 0],
        2,
        num_attention_heads=8,
        num_experts=8,
        o_groups=4,
        yarn=True,
        swiglu_limit=0.25,
        routed_scaling_factor=2.5,
        seq_lens=(2, 9, 16, 17),
    ),
    # HCA only and three hash layers (all but one)
    TinyConfig("hca-hash3", [128, 128, 0, 0], 3, num_experts=6, yarn=True, seq_lens=(127, 128, 129)),
]


def hf_config(tiny: TinyConfig, vocab: int = 97, mtp: int = 0) -> DeepseekV4Config:
    rope = {}
    if tiny.yarn:
        rope = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        }
    config = DeepseekV4Config(
        vocab_size=vocab,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=len(tiny.compress_ratios),
        num_attention_heads=tiny.num_attention_heads,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=tiny.o_groups,
        o_lora_rank=16,
        sliding_window=WINDOW,
        compress_ratios=tiny.compress_ratios,
        num_hash_layers=tiny.num_hash_layers,
        n_routed_experts=tiny.num_experts,
        num_experts_per_tok=2,
        routed_scaling_factor=tiny.routed_scaling_factor,
        swiglu_limit=tiny.swiglu_limit,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=4,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_parameters=rope or None,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
        initializer_range=0.05,
        num_nextn_predict_layers=mtp,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    return config


def our_config(tiny: TinyConfig, layout, vocab: int = 97, mtp: int = 0, **overrides):
    yarn = {}
    if tiny.yarn:
        yarn = dict(
            yarn_factor=4.0,
            yarn_original_max_position_embeddings=64,
            yarn_beta_fast=32.0,
            yarn_beta_slow=1.0,
        )
    return DeepSeekV4TransformerConfig(
        num_layers=len(tiny.compress_ratios),
        hidden_size=64,
        num_attention_heads=tiny.num_attention_heads,
        kv_channels=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        o_groups=tiny.o_groups,
        o_lora_rank=16,
        sliding_window=WINDOW,
        compress_ratios=tiny.compress_ratios,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=4,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        **(yarn or dict(yarn_factor=None)),
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        num_hash_layers=tiny.num_hash_layers,
        swiglu_limit=tiny.swiglu_limit,
        vocab_size=vocab,
        num_moe_experts=tiny.num_experts,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_router_topk_scaling_factor=tiny.routed_scaling_factor,
        layernorm_epsilon=1e-6,
        mtp_num_layers=mtp or None,
        use_cpu_initialization=True,
        **layout.config_kwargs(),
        **overrides,
    )


@torch.no_grad()
def randomise(model: torch.nn.Module, vocab: int, topk: int, num_experts: int) -> None:
    """Make the tensors that transformers initialises to 0 / 1 non-trivial."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "tid2eid":
            rows = [torch.randperm(num_experts)[:topk] for _ in range(vocab)]
            tensor.copy_(torch.stack(rows))
        elif leaf in ("base", "hc_base", "e_score_correction_bias"):
            tensor.normal_(0.0, 0.5)
        elif leaf in ("scale", "hc_scale"):
            tensor.uniform_(0.5, 1.5)
        elif leaf in ("sinks", "position_bias"):
            tensor.normal_(0.0, 1.0)
        elif "norm" in name and leaf == "weight":
            tensor.uniform_(0.8, 1.2)


def hf_model(tiny: TinyConfig, seed: int = 0, mtp: int = 0) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    config = hf_config(tiny, mtp=mtp)
    model = DeepseekV4ForCausalLM(config).float()
    randomise(model, config.vocab_size, config.num_experts_per_tok, config.n_routed_experts)
    return model


# ----------------------------------------------------------------------------- name map
ATTENTION_NAMES = {
    "q_a_proj.weight": "linear_q_down_proj.weight",
    "q_a_norm.weight": "q_layernorm.weight",
    "q_b_proj.weight": "linear_q_up_proj.weight",
    "kv_proj.weight": "linear_kv.weight",
    "kv_norm.weight": "kv_layernorm.weight",
    "sinks": "attn_sink",
    "o_a_proj.weight": "linear_o_down_proj.weight",
    "o_b_proj.weight": "linear_proj.weight",
    "compressor.kv_proj.weight": "compressor.linear_kv.weight",
    "compressor.gate_proj.weight": "compressor.linear_gate.weight",
    "compressor.position_bias": "compressor.ape",
    "compressor.kv_norm.weight": "compressor.norm.weight",
    "compressor.indexer.kv_proj.weight": "indexer.compressor.linear_kv.weight",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.linear_gate.weight",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight",
    "compressor.indexer.q_b_proj.weight": "indexer.linear_q_up_proj.weight",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.linear_weights_proj.weight",
}

LAYER_NAMES = {
    "attn_hc.fn": "hc_attn.fn",
    "attn_hc.base": "hc_attn.base",
    "attn_hc.scale": "hc_attn.scale",
    "ffn_hc.fn": "hc_ffn.fn",
    "ffn_hc.base": "hc_ffn.base",
    "ffn_hc.scale": "hc_ffn.scale",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "mlp.gate.tid2eid": "mlp.router.tid2eid",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    **{f"self_attn.{hf}": f"self_attention.{ours}" for hf, ours in ATTENTION_NAMES.items()},
}

TOP_NAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.hc_head.hc_fn": "decoder.hc_head.fn",
    "model.hc_head.hc_base": "decoder.hc_head.base",
    "model.hc_head.hc_scale": "decoder.hc_head.scale",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def hf_layer_to_ours(hf: dict[str, torch.Tensor], hf_prefix: str, prefix: str) -> dict[str, torch.Tensor]:
    """One decoder layer: transformers in-memory tensors -> contract names (local expert flavour)."""
    out = {}
    for hf_name, ours in LAYER_NAMES.items():
        if hf_prefix + hf_name in hf:
            out[prefix + ours] = hf[hf_prefix + hf_name]
    out[prefix + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
        [hf[hf_prefix + "mlp.shared_experts.gate_proj.weight"], hf[hf_prefix + "mlp.shared_experts.up_proj.weight"]]
    )
    gate_up, down = hf[hf_prefix + "mlp.experts.gate_up_proj"], hf[hf_prefix + "mlp.experts.down_proj"]
    for e in range(gate_up.shape[0]):
        out[f"{prefix}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
        out[f"{prefix}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    return out


def hf_to_ours(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {ours: hf[hf_name] for hf_name, ours in TOP_NAMES.items()}
    for i in range(num_layers):
        out.update(hf_layer_to_ours(hf, f"model.layers.{i}.", f"decoder.layers.{i}."))
    return out


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def load_from_hf(ours: torch.nn.Module, hf: DeepseekV4ForCausalLM, num_layers: int) -> None:
    mapped = hf_to_ours(hf_tensors(hf), num_layers)
    own = {n: t for n, t in ours.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}
    missing = sorted(set(own) - set(mapped))
    assert not missing, f"our tensors with no transformers source: {missing}"
    with torch.no_grad():
        for name, tensor in mapped.items():
            assert own[name].shape == tensor.shape, (name, own[name].shape, tensor.shape)
            own[name].copy_(tensor)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def layout():
    layout = megatron_v4.initialize(seed=1234)
    yield layout
    megatron_v4.destroy()


def build_ours(config, decoder_spec=None, mtp_spec=None) -> DeepSeekV4Model:
    return DeepSeekV4Model(
        config,
        decoder_spec=decoder_spec or get_dsv4_decoder_block_spec(config, use_te=False),
        mtp_spec=mtp_spec or (get_dsv4_mtp_block_spec(config, use_te=False) if config.mtp_num_layers else None),
    )


def relative_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("tiny", CONFIGS, ids=[c.name for c in CONFIGS])
def test_fp32_logits_loss_and_grads_match_transformers(layout, tiny: TinyConfig):
    hf = hf_model(tiny)
    ours = build_ours(our_config(tiny, layout))
    load_from_hf(ours, hf, len(tiny.compress_ratios))
    hf.train()
    ours.train()

    for seq in tiny.seq_lens:
        generator = torch.Generator().manual_seed(seq)
        input_ids = torch.randint(0, hf.config.vocab_size, (2, seq), generator=generator)
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)

        hf_out = hf(input_ids=input_ids, labels=input_ids if seq > 1 else None)
        logits = ours(input_ids)
        diff = (logits - hf_out.logits).abs().max().item()
        scale = hf_out.logits.abs().max().item()
        print(f"[{tiny.name} seq={seq}] logits max|diff|={diff:.3e} rel={diff / scale:.3e}")
        assert diff <= 1e-4 and diff <= 1e-5 * scale, (seq, diff, scale)

        if seq > 1:
            labels = torch.roll(input_ids, -1, dims=1)
            per_token = ours(input_ids, labels=labels)
            assert per_token.shape == (2, seq)
            loss = per_token[:, :-1].mean()
            loss_diff = abs(loss.item() - hf_out.loss.item())
            print(f"[{tiny.name} seq={seq}] loss ours={loss.item():.6f} hf={hf_out.loss.item():.6f}")
            assert loss_diff <= 1e-5 * abs(hf_out.loss.item()), loss_diff
            hf_loss = hf_out.loss
        else:
            weights = torch.randn(hf_out.logits.shape, generator=generator)
            loss = (logits * weights).sum()
            hf_loss = (hf_out.logits * weights).sum()
        hf_loss.backward()
        loss.backward()

        hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
        expected = hf_to_ours(hf_grads, len(tiny.compress_ratios))
        worst = 0.0
        for name, param in ours.named_parameters():
            if name not in expected:
                assert param.grad is None or param.grad.abs().max() == 0, f"{name} has a gradient transformers lacks"
                continue
            assert param.grad is not None, f"{name} got no gradient"
            rel = relative_frobenius(param.grad, expected[name])
            worst = max(worst, rel)
            assert rel <= 1e-4, (seq, name, rel)
        print(f"[{tiny.name} seq={seq}] worst grad rel Frobenius={worst:.3e}")
