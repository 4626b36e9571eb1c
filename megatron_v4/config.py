"""`DeepSeekV4TransformerConfig`: Megatron-Core's TransformerConfig plus the DeepSeek-V4 fields.

Field names follow the official `config.json` where Megatron-Core has no
field of its own; Megatron-Core's own fields (hidden_size, num_attention_heads,
num_moe_experts, moe_router_topk, layernorm_epsilon, mtp_num_layers, ...) keep
their meaning. `kv_channels` is the attention head dim (512 in the real models).

Parallel sizes are checked when the config is built, before Megatron-Core's own
checks, and a size that does not divide is refused with the sizes that would:
tp must divide num_attention_heads, o_groups, vocab_size, index_n_heads (with
CSA layers), hidden_size (with MTP) and the shared expert's width; ep must
divide num_moe_experts; etp must divide moe_ffn_hidden_size; pp * vpp must not
exceed num_layers. When pp * vpp does not divide num_layers (V4-Flash has 43
layers, V4-Pro 61), an uneven `pipeline_model_parallel_layout` is filled in
(see `_default_pipeline_layout`); Megatron-Core's own layout options override it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_v4.indexer_loss import IndexerLossAutoScaler

SLIDING, CSA, HCA = 0, 4, 128
SUPPORTED_COMPRESS_RATIOS = (SLIDING, CSA, HCA)
SELECTIVE_RECOMPUTE_MODULES = {"moe", "moe_act", "shared_experts"}
"""Megatron-Core's selective-recompute modules that live inside modules DeepSeek-V4 reuses (its
MoELayer, experts and shared expert); the attention, norms and layer are this package's own."""


@dataclass
class DeepSeekV4TransformerConfig(TransformerConfig):
    """Megatron-Core config of a DeepSeek-V4 model (V4-Flash, V4-Pro, or smaller of the same design)."""

    # DeepSeek-V4 trains without dropout (Megatron-Core's defaults are 0.1).
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    # Attention (DeepSeek-V4 report, "Hybrid Attention"; official inference code `Attention`)
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: list[int] = field(default_factory=list)
    """One entry per decoder layer: 0 sliding window only, 4 CSA, 128 HCA (MTP layers are always 0)."""

    # Lightning indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512

    # Training the indexer by distillation from the main attention (DeepSeek-V3.2 report, section 2.1;
    # Megatron-LM's dsa_indexer_loss_coeff / dsa_indexer_use_sparse_loss). See megatron_v4.indexer_loss.
    indexer_loss_coeff: float = 0.0
    """Weight of the indexer's KL loss in the training loss; 0 computes no indexer loss."""
    indexer_use_sparse_loss: bool = False
    """False: the loss covers every visible compressed entry (indexer warm-up, with
    csa_dense_attention); True: only the indexer's top-k picks (sparse training)."""
    csa_dense_attention: bool = False
    """CSA layers attend to every visible compressed entry, as HCA layers do (the dense and
    indexer warm-up phases); the indexer then runs only to compute the dense indexer loss."""

    # RoPE: plain `rope_theta` on sliding layers, `compress_rope_theta` + YaRN on compressed ones
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float | None = 16.0
    """None disables YaRN (frequencies are then plain compress_rope_theta)."""
    yarn_original_max_position_embeddings: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    # Manifold-constrained hyper-connections (DeepSeek-V4 report, "mHC"; transformers `DeepseekV4HyperConnection`)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6

    # MoE (official inference code `Gate`/`MoE`: sqrtsoftplus scores, hash routing, clamped SwiGLU)
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    """Clamp of the SwiGLU of routed and shared experts (gate from above, up on both sides);
    0 disables it. Becomes Megatron-Core's `activation_func_clamp_value`."""

    vocab_size: int | None = None
    """Vocabulary size (the model's embedding/output and the hash routers' tid2eid rows)."""

    # DeepSeek-V4's fixed design choices, as Megatron-Core fields. They are defaults here, not
    # overrides: a config that sets one of them otherwise is refused (see `_check_design_choices`).
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    moe_router_score_function: str = "sqrtsoftplus"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = True
    """Aux-loss-free balancing: every learned router has a selection-only expert bias."""
    moe_router_dtype: str | None = "fp32"

    def __post_init__(self):
        self._check_design_choices()
        if self.activation_func_clamp_value is None:
            self.activation_func_clamp_value = self.swiglu_limit or None
        elif self.activation_func_clamp_value != self.swiglu_limit:
            raise ValueError(
                f"activation_func_clamp_value={self.activation_func_clamp_value} disagrees with "
                f"swiglu_limit={self.swiglu_limit}; set swiglu_limit only (it becomes the clamp)"
            )
        # Before Megatron-Core's own checks, so that a size that does not divide gets our message.
        self._check_parallel_sizes()
        self._default_pipeline_layout()
        super().__post_init__()
        self._validate_deepseek_v4()
        if getattr(self, "mtp_standalone", False):
            raise ValueError(
                "pipeline_model_parallel_layout puts the MTP layers before the last pipeline stage; "
                "DeepSeek-V4 runs MTP on the last stage: move 'mtp' into the last stage's entry"
            )

    def _check_design_choices(self) -> None:
        """Refuse a Megatron-Core option set against DeepSeek-V4's design instead of changing it."""
        required = {
            "normalization": "RMSNorm",
            "gated_linear_unit": True,
            "activation_func": F.silu,
            "add_bias_linear": False,
            "add_qkv_bias": False,
        }
        if self.num_moe_experts:
            required.update(
                moe_router_score_function="sqrtsoftplus",
                moe_router_pre_softmax=False,
                moe_router_enable_expert_bias=True,
            )
        for name, value in required.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: DeepSeek-V4 uses {name}={value!r}; leave it unset"
                )

    def _validate_deepseek_v4(self) -> None:
        if len(self.compress_ratios) != self.num_layers:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries but num_layers is "
                f"{self.num_layers}; give one ratio (0, 4 or 128) per decoder layer"
            )
        bad = sorted({r for r in self.compress_ratios if r not in SUPPORTED_COMPRESS_RATIOS})
        if bad:
            raise ValueError(
                f"compress_ratios contains {bad}; DeepSeek-V4 layers use 0 (sliding), 4 (CSA) or 128 (HCA)"
            )
        if self.kv_channels is None or self.qk_rope_head_dim > self.kv_channels:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be <= kv_channels (head dim) "
                f"={self.kv_channels}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotated in pairs)")
        if self.num_attention_heads % self.o_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"o_groups={self.o_groups}; choose o_groups among the divisors of the head count"
            )
        if not 0 <= self.num_hash_layers <= self.num_layers:
            raise ValueError(
                f"num_hash_layers={self.num_hash_layers} must be between 0 and num_layers={self.num_layers}"
            )
        if self.num_moe_experts and self.moe_router_topk < 2:
            raise ValueError(
                f"moe_router_topk={self.moe_router_topk}: Megatron-Core's router skips the weight "
                "normalisation for a single expert, DeepSeek-V4 normalises; use moe_router_topk >= 2"
            )
        if self.moe_apply_probs_on_input:
            raise ValueError(
                "moe_apply_probs_on_input=True scales the expert input, but DeepSeek-V4 weights the "
                "expert output (w2(...) * weight); leave it False"
            )
        if self.activation_func_clamp_value is not None and (
            self.bias_activation_fusion
            or self.use_te_activation_func
            or self.use_transformer_engine_op_fuser
        ):
            raise ValueError(
                "the fused SwiGLU kernels ignore the swiglu_limit clamp; set bias_activation_fusion, "
                "use_te_activation_func and use_transformer_engine_op_fuser to False (or swiglu_limit=0)"
            )
        if self.recompute_granularity == "selective":
            unhonoured = sorted(set(self.recompute_modules) - SELECTIVE_RECOMPUTE_MODULES)
            if unhonoured:
                raise ValueError(
                    f"recompute_modules {unhonoured} name Megatron-Core modules DeepSeek-V4 does not use; "
                    f"choose among {sorted(SELECTIVE_RECOMPUTE_MODULES)} or recompute_granularity='full'"
                )
        self._validate_indexer_training()
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            raise ValueError(
                f"hc_mult={self.hc_mult} and hc_sinkhorn_iters={self.hc_sinkhorn_iters} must be >= 1"
            )

    def _validate_indexer_training(self) -> None:
        if self.indexer_loss_coeff < 0:
            raise ValueError(f"indexer_loss_coeff={self.indexer_loss_coeff} must be >= 0 (0 turns the loss off)")
        if not self.indexer_loss_coeff:
            return
        if CSA not in self.compress_ratios:
            raise ValueError(
                "indexer_loss_coeff > 0 but compress_ratios has no CSA layer (ratio 4) with an indexer; "
                "set indexer_loss_coeff=0"
            )
        if self.indexer_use_sparse_loss and self.csa_dense_attention:
            raise ValueError(
                "the sparse indexer loss covers the indexer's top-k picks, which csa_dense_attention does "
                "not use; set indexer_use_sparse_loss=False (dense loss) for the indexer warm-up"
            )
        if not self.indexer_use_sparse_loss and not self.csa_dense_attention:
            # The teacher's mass on entries the top-k attention left out is never computed.
            raise ValueError(
                "the dense indexer loss needs the attention's probabilities of every visible entry, which "
                "top-k attention does not compute; set csa_dense_attention=True (indexer warm-up) or "
                "indexer_use_sparse_loss=True (sparse training)"
            )
        if self.calculate_per_token_loss:
            raise ValueError(
                "the indexer loss is a per-micro-batch token mean, as the loss scale of "
                "calculate_per_token_loss=False assumes; set calculate_per_token_loss=False"
            )
        if self.experimental_attention_variant_loss_scale_func is None:
            # Megatron-Core's schedules hand this hook the main loss's backward scale.
            self.experimental_attention_variant_loss_scale_func = IndexerLossAutoScaler.set_loss_scale

    def _check_parallel_sizes(self) -> None:
        """Refuse model dims that the parallel sizes do not divide, naming the sizes that would."""
        tp, ep, etp = (
            self.tensor_model_parallel_size,
            self.expert_model_parallel_size,
            self.expert_tensor_parallel_size or self.tensor_model_parallel_size,
        )
        split_over_tp = {
            "num_attention_heads": self.num_attention_heads,
            "o_groups": self.o_groups,
            "vocab_size": self.vocab_size,
        }
        if CSA in self.compress_ratios:
            split_over_tp["index_n_heads"] = self.index_n_heads
        if self.mtp_num_layers:
            split_over_tp["hidden_size"] = self.hidden_size  # MTP's column-parallel e_proj/h_proj
        if self.moe_shared_expert_intermediate_size:
            split_over_tp["moe_shared_expert_intermediate_size"] = self.moe_shared_expert_intermediate_size
        checks = [(name, value, "tp", tp) for name, value in split_over_tp.items()]
        if self.num_moe_experts:
            checks.append(("num_moe_experts", self.num_moe_experts, "ep", ep))
            expert_width = self.moe_ffn_hidden_size or self.ffn_hidden_size
            checks.append(("moe_ffn_hidden_size", expert_width, "etp", etp))
        for name, value, size_name, size in checks:
            if value and value % size:
                divisors = [d for d in range(1, value + 1) if value % d == 0]
                raise ValueError(
                    f"{name}={value} is not divisible by {size_name}={size}; "
                    f"use {size_name} in {{{', '.join(map(str, divisors))}}}"
                )

    def _default_pipeline_layout(self) -> None:
        """Split the decoder layers over the pipeline stages when the user did not.

        Megatron-Core splits evenly by itself. When pp * vpp does not divide num_layers,
        this writes a `pipeline_model_parallel_layout` in which the first
        num_layers % (pp * vpp) virtual stages hold one layer more; the last stage, which
        also runs MTP and the output layer, is never one of them unless every stage is.
        Users override it with Megatron-Core's own `pipeline_model_parallel_layout` (e.g.
        "Et*3|t*2mL") or `num_layers_in_first/last_pipeline_stage`.
        """
        pp = self.pipeline_model_parallel_size
        user_layout = (
            self.pipeline_model_parallel_layout is not None
            or self.num_layers_in_first_pipeline_stage is not None
            or self.num_layers_in_last_pipeline_stage is not None
            or self.account_for_embedding_in_pipeline_split
            or self.account_for_loss_in_pipeline_split
        )
        if pp == 1 or user_layout:
            return
        stages = pp * (self.virtual_pipeline_model_parallel_size or 1)
        if self.num_layers < stages:
            raise ValueError(
                f"num_layers={self.num_layers} cannot give each of the pp*vpp={stages} pipeline "
                f"stages a layer; use pp*vpp <= {self.num_layers}"
            )
        if self.num_layers % stages == 0:
            return
        base, extra = divmod(self.num_layers, stages)
        layout = [["decoder"] * (base + (stage < extra)) for stage in range(stages)]
        layout[0].insert(0, "embedding")
        layout[-1] += ["mtp"] * (self.mtp_num_layers or 0) + ["loss"]
        self.pipeline_model_parallel_layout = layout

    @property
    def is_hash_layer(self) -> list[bool]:
        return [i < self.num_hash_layers for i in range(self.num_layers)]
