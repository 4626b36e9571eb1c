"""DeepSeekV4Model against transformers' DeepseekV4ForCausalLM (float32, CPU, one rank).

Random tiny transformers models (every bias, hc parameter, attention sink and
ape made non-trivial) are copied into our model through an explicit map from
transformers' in-memory names to the Megatron-Core names of the contract;
logits, loss and every parameter's gradient are compared (also under full
activation recompute). The bfloat16 test compares our error to transformers'
own bf16 error; the MTP test checks the MTP logits, loss and gradients against
a formula-level reference of the MTP layer as the DeepSeek-V4 report and
the official inference code (`MTPBlock`) describe it. Also: distributed-checkpoint round
trip, where the routing tables live, Megatron's balance-loss logging.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import Float16Module
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import megatron_v4
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.model import DeepSeekV4Model
from megatron_v4.specs import get_dsv4_decoder_block_spec, get_dsv4_mtp_block_spec
from transformers_names import ATTENTION_NAMES

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


def hf_model(tiny: TinyConfig, seed: int = 0, mtp: int = 0, vocab: int = 97) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    config = hf_config(tiny, vocab=vocab, mtp=mtp)
    model = DeepseekV4ForCausalLM(config).float()
    randomise(model, config.vocab_size, config.num_experts_per_tok, config.n_routed_experts)
    return model


# ----------------------------------------------------------------------------- name map
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


def assert_grads_match(ours: torch.nn.Module, expected: dict[str, torch.Tensor], tag: str) -> None:
    """Every gradient within 1e-4 relative Frobenius of transformers'; none where transformers has none
    (the lightning indexer only selects entries, so it gets no gradient from the loss in either)."""
    worst, worst_name = 0.0, None
    for name, param in ours.named_parameters():
        if name not in expected:
            assert param.grad is None or not param.grad.any(), f"{name} has a gradient transformers lacks"
            continue
        assert param.grad is not None, f"{name} got no gradient"
        rel = relative_frobenius(param.grad, expected[name])
        if rel > worst:
            worst, worst_name = rel, name
        assert rel <= 1e-4, (tag, name, rel)
    print(f"[{tag}] worst grad rel Frobenius={worst:.3e} ({worst_name})")


# ----------------------------------------------------------------------------- fp32 parity
def check_against_transformers(tiny: TinyConfig, layout, seq_lens, tag: str, **overrides) -> None:
    hf = hf_model(tiny)
    ours = build_ours(our_config(tiny, layout, **overrides))
    load_from_hf(ours, hf, len(tiny.compress_ratios))
    hf.train()
    ours.train()

    for seq in seq_lens:
        generator = torch.Generator().manual_seed(seq)
        input_ids = torch.randint(0, hf.config.vocab_size, (2, seq), generator=generator)
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)

        hf_out = hf(input_ids=input_ids, labels=input_ids if seq > 1 else None)
        logits = ours(input_ids)
        diff = (logits - hf_out.logits).abs().max().item()
        scale = hf_out.logits.abs().max().item()
        print(f"[{tag} seq={seq}] logits max|diff|={diff:.3e} rel={diff / scale:.3e}")
        assert diff <= 1e-4 and diff <= 1e-5 * scale, (seq, diff, scale)

        if seq > 1:
            labels = torch.roll(input_ids, -1, dims=1)
            per_token = ours(input_ids, labels=labels)
            assert per_token.shape == (2, seq)
            loss = per_token[:, :-1].mean()
            loss_diff = abs(loss.item() - hf_out.loss.item())
            print(f"[{tag} seq={seq}] loss ours={loss.item():.6f} hf={hf_out.loss.item():.6f}")
            assert loss_diff <= 1e-5 * abs(hf_out.loss.item()), loss_diff
            hf_loss = hf_out.loss
        else:
            weights = torch.randn(hf_out.logits.shape, generator=generator)
            loss = (logits * weights).sum()
            hf_loss = (hf_out.logits * weights).sum()
        hf_loss.backward()
        loss.backward()

        hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
        assert_grads_match(ours, hf_to_ours(hf_grads, len(tiny.compress_ratios)), f"{tag} seq={seq}")


@pytest.mark.parametrize("tiny", CONFIGS, ids=[c.name for c in CONFIGS])
def test_fp32_logits_loss_and_grads_match_transformers(layout, tiny: TinyConfig):
    check_against_transformers(tiny, layout, tiny.seq_lens, tiny.name)


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_full_activation_recompute_matches_transformers(layout, method: str):
    check_against_transformers(
        CONFIGS[0],
        layout,
        (9,),
        f"recompute-{method}",
        recompute_granularity="full",
        recompute_method=method,
        recompute_num_layers=2,
    )

def test_moe_recompute_matches_transformers(layout):
    """Megatron-Core's own MoE recompute (recompute_modules=["moe"]) on hash-routed and learned layers:
    the recomputed routing must see the same token ids in the backward."""
    check_against_transformers(
        CONFIGS[2], layout, (129,), "recompute-moe", recompute_granularity="selective", recompute_modules=["moe"]
    )


# ----------------------------------------------------------------------------- bfloat16
def transformers_bf16(hf: DeepseekV4ForCausalLM, tmp_path) -> DeepseekV4ForCausalLM:
    """transformers' own bf16 model: loaded in bf16, keeping its `_keep_in_fp32_modules_strict` in fp32."""
    hf.save_pretrained(tmp_path)
    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model.config._attn_implementation = "eager"
    return model.eval()


def test_bf16_error_within_transformers_bf16_error(layout, tmp_path):
    tiny = CONFIGS[0]
    hf = hf_model(tiny, seed=3).eval()
    hf16 = transformers_bf16(hf, tmp_path)
    config = our_config(tiny, layout, bf16=True, params_dtype=torch.bfloat16)
    ours = build_ours(config)
    load_from_hf(ours, hf, len(tiny.compress_ratios))
    ours = Float16Module(config, ours).eval()

    input_ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = hf(input_ids=input_ids).logits
        theirs = hf16(input_ids=input_ids).logits.float()
        logits = ours(input_ids)
    assert logits.dtype == torch.float32
    our_err, their_err = (logits - reference).abs(), (theirs - reference).abs()
    print(
        f"[bf16] ours max {our_err.max():.3e} mean {our_err.mean():.3e}; "
        f"transformers max {their_err.max():.3e} mean {their_err.mean():.3e}"
    )
    assert our_err.max() <= 1.5 * their_err.max()
    assert our_err.mean() <= 1.5 * their_err.mean()


# ----------------------------------------------------------------------------- MTP
class ReferenceMTP(torch.nn.Module):
    """The MTP layer (official inference code `MTPBlock`) written out with transformers' modules: one MTP depth on top of `hf`."""

    def __init__(self, hf: DeepseekV4ForCausalLM):
        super().__init__()
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_modules

        config = copy.deepcopy(hf.config)
        index = config.num_hidden_layers
        config.num_hidden_layers += 1
        config.layer_types = [*config.layer_types, "sliding_attention"]
        config.mlp_layer_types = [*config.mlp_layer_types, "moe"]
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = hf_modules.DeepseekV4RMSNorm(hidden, eps)
        self.hnorm = hf_modules.DeepseekV4RMSNorm(hidden, eps)
        self.e_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.h_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.block = hf_modules.DeepseekV4DecoderLayer(config, index)
        self.hc_head = hf_modules.DeepseekV4HyperHead(config)
        self.norm = hf_modules.DeepseekV4RMSNorm(hidden, eps)
        with torch.no_grad():
            for param in self.parameters():
                param.normal_(0.0, 0.05)
        randomise(self, config.vocab_size, config.num_experts_per_tok, config.n_routed_experts)

    def forward(self, hf: DeepseekV4ForCausalLM, streams: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Main streams H [b, s, n, D] -> MTP logits [b, s, V]; position t predicts token t + 2."""
        batch, seq = input_ids.shape
        next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        e = self.e_proj(self.enorm(hf.model.embed_tokens(next_ids)))
        x = e.unsqueeze(2) + self.h_proj(self.hnorm(streams))
        positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
        rope = {kind: hf.model.rotary_emb(x, position_ids=positions, layer_type=kind) for kind in ("main", "compress")}
        query, key = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
        visible = (key <= query) & (query - key < hf.config.sliding_window)
        mask = torch.zeros(seq, seq).masked_fill(~visible, float("-inf")).expand(batch, 1, seq, seq)
        x = self.block(x, position_embeddings=rope, position_ids=positions, attention_mask=mask)
        return hf.lm_head(self.norm(self.hc_head(x)))


def mtp_to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference MTP's tensors (or gradients) -> contract names."""
    prefix = "mtp.layers.0."
    out = hf_layer_to_ours(tensors, "block.", prefix + "transformer_layer.")
    for name in ("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight"):
        out[prefix + name] = tensors[name]
    out.update(
        {
            prefix + "hc_head.fn": tensors["hc_head.hc_fn"],
            prefix + "hc_head.base": tensors["hc_head.hc_base"],
            prefix + "hc_head.scale": tensors["hc_head.hc_scale"],
            prefix + "final_layernorm.weight": tensors["norm.weight"],
        }
    )
    return out


def test_mtp_logits_loss_and_grads_match_the_spec(layout):
    tiny = TinyConfig("mtp", [0, 4], 1, seq_lens=(12,))
    scaling = 0.3
    hf = hf_model(tiny, seed=5, mtp=1).train()
    reference = ReferenceMTP(hf).train()
    config = our_config(tiny, layout, mtp=1, mtp_loss_scaling_factor=scaling)
    ours = build_ours(config).train()
    mapped = {**hf_to_ours(hf_tensors(hf), 2), **mtp_to_ours(hf_tensors(reference))}
    own = {n: t for n, t in ours.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}
    assert sorted(own) == sorted(mapped)
    with torch.no_grad():
        for name, tensor in mapped.items():
            own[name].copy_(tensor)

    batch, seq = 2, 12
    input_ids = torch.randint(0, hf.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(11))
    labels = torch.roll(input_ids, -1, dims=1)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -1] = 0

    # Reference: main loss + scaling * mean over t <= s-3 of CE(MTP logits at t, token t+2).
    captured = {}
    hook = hf.model.hc_head.register_forward_pre_hook(lambda module, args: captured.update(streams=args[0]))
    hf_out = hf(input_ids=input_ids, labels=input_ids)
    hook.remove()
    ref_mtp_logits = reference(hf, captured["streams"], input_ids)
    ref_mtp_loss = F.cross_entropy(
        ref_mtp_logits[:, : seq - 2].reshape(-1, hf.config.vocab_size), input_ids[:, 2:].reshape(-1)
    )
    (hf_out.loss + scaling * ref_mtp_loss).backward()

    our_mtp = {}
    hook = ours.mtp.register_forward_hook(lambda module, args, output: our_mtp.update(hidden=output[0]))
    per_token = ours(input_ids, labels=labels, loss_mask=loss_mask)
    hook.remove()
    main_loss = (per_token * loss_mask).sum() / loss_mask.sum()
    main_loss.backward()
    mtp_logits = ours.output_layer(our_mtp["hidden"])[0].transpose(0, 1)
    mtp_loss = F.cross_entropy(
        mtp_logits[:, : seq - 2].reshape(-1, hf.config.vocab_size), input_ids[:, 2:].reshape(-1)
    )

    logits_diff = (mtp_logits - ref_mtp_logits).abs().max().item()
    print(
        f"[mtp] logits max|diff|={logits_diff:.3e} (max {ref_mtp_logits.abs().max():.3f}); "
        f"main loss ours={main_loss.item():.6f} hf={hf_out.loss.item():.6f}; "
        f"mtp loss ours={mtp_loss.item():.6f} ref={ref_mtp_loss.item():.6f}"
    )
    assert logits_diff <= 1e-5 * ref_mtp_logits.abs().max().item()
    assert abs(main_loss.item() - hf_out.loss.item()) <= 1e-5 * hf_out.loss.item()
    assert abs(mtp_loss.item() - ref_mtp_loss.item()) <= 1e-5 * ref_mtp_loss.item()

    expected = {
        **hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, 2),
        **mtp_to_ours({n: p.grad for n, p in reference.named_parameters() if p.grad is not None}),
    }
    assert_grads_match(ours, expected, "mtp")


# ----------------------------------------------------------------------------- checkpointing
def test_sharded_state_dict_round_trip(layout, tmp_path):
    """Distributed checkpoint save/load restores every tensor, the tid2eid buffers included."""
    from megatron.core import dist_checkpointing

    tiny = CONFIGS[0]
    config = our_config(tiny, layout, mtp=1)
    torch.manual_seed(0)
    saved = build_ours(config)
    randomise(saved, config.vocab_size, 2, tiny.num_experts)
    sharded = saved.sharded_state_dict()
    plain = {n for n in saved.state_dict() if not n.endswith("_extra_state")}
    assert plain <= set(sharded), sorted(plain - set(sharded))
    assert sharded["decoder.layers.0.mlp.router.tid2eid"].key == "decoder.layers.0.mlp.router.tid2eid"
    dist_checkpointing.save(sharded, tmp_path)

    torch.manual_seed(1)
    loaded = build_ours(config)
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), tmp_path))
    for (name, before), after in zip(saved.state_dict().items(), loaded.state_dict().values()):
        if torch.is_tensor(before):
            assert torch.equal(before, after), name


def test_routing_tensors_are_buffers_where_the_checkpoint_expects_them(layout):
    tiny = CONFIGS[1]  # two hash layers, then learned routing
    ours = build_ours(our_config(tiny, layout, mtp=1))
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    persistent = set(ours.state_dict())
    for i in range(len(tiny.compress_ratios)):
        router = f"decoder.layers.{i}.mlp.router."
        if i < tiny.num_hash_layers:
            assert buffers[router + "tid2eid"].dtype == torch.int64
            table = buffers[router + "tid2eid"]
            assert table.shape == (97, 2)
            # A fresh table routes each token to distinct experts, every expert about equally
            # often (each of the k columns is a shifted token id mod E).
            assert (table[:, 0] != table[:, 1]).all()
            counts = torch.bincount(table.flatten(), minlength=tiny.num_experts)
            assert counts.max() - counts.min() <= table.shape[1]
            assert router + "expert_bias" not in persistent
        else:
            assert buffers[router + "expert_bias"].dtype == torch.float32
            assert router + "tid2eid" not in persistent
        assert router + "tid2eid" not in params and router + "expert_bias" not in params
        assert {router + "tid2eid", router + "expert_bias"} & persistent
    assert "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in persistent
    assert not any("tid2eid" in name for name in persistent if name.startswith("mtp."))


def test_sequence_aux_loss_is_logged_per_layer_with_mtp(layout):
    """Megatron-Core's balance losses work with our layers: learned routers (the MTP one included,
    under Megatron's MTP numbering) record a value, the hash-routed layer none."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker

    tiny = CONFIGS[0]
    config = our_config(tiny, layout, mtp=1, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)
    ours = build_ours(config).train()
    destroy_moe_metrics_tracker()
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    ours(input_ids, labels=torch.roll(input_ids, -1, dims=1)).mean().backward()
    values = get_moe_metrics_tracker().metrics["seq_load_balancing_loss"].values
    destroy_moe_metrics_tracker()
    assert values.shape == (len(tiny.compress_ratios) + 1,)
    assert values[0] == 0 and (values[1:] > 0).all(), values
