"""Module specs of the DeepSeek-V4 decoder layers, decoder block and MTP block.

Two flavours with the same parameter names except for the routed experts:
- Transformer Engine (`use_te=True`): TE norms and linears, TEGroupedMLP
  experts (`mlp.experts.linear_fc1.weight{e}`);
- local Megatron-Core modules (`use_te=False`): torch RMSNorm (`megatron_v4.norm`), Column/Row
  ParallelLinear, SequentialMLP experts (`mlp.experts.local_experts.{e}.linear_fc1.weight`).
`use_te=None` picks TE when `transformer_engine` imports.

Per layer: the attention of the layer's compress ratio (`config.compress_ratios`),
a hash router on the first `num_hash_layers` layers and the learned
(bias-balanced) top-k router elsewhere. MTP layers use sliding-window attention
and the learned router.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_v4.attention import (
    DeepSeekV4HybridSelfAttention,
    DeepSeekV4HybridSelfAttentionSubmodules,
    GroupedColumnParallelLinear,
)
from megatron_v4.compressor import DeepSeekV4Compressor, DeepSeekV4CompressorSubmodules, ReplicatedLinear
from megatron_v4.config import SLIDING, DeepSeekV4TransformerConfig
from megatron_v4.indexer import DeepSeekV4Indexer, DeepSeekV4IndexerSubmodules
from megatron_v4.layer import (
    DeepSeekV4BlockSubmodules,
    DeepSeekV4LayerSubmodules,
    DeepSeekV4TransformerLayer,
)
from megatron_v4.moe import DeepSeekV4MoELayer
from megatron_v4.norm import RMSNorm
from megatron_v4.mtp import DeepSeekV4MTPBlockSubmodules, DeepSeekV4MTPLayer, DeepSeekV4MTPLayerSubmodules
from megatron_v4.router import HashRouter


def _resolve_use_te(use_te: bool | None) -> bool:
    """The one place that decides between Transformer Engine and local modules: Megatron-Core's own
    `HAVE_TE` (Transformer Engine imports and is usable) unless the caller chose."""
    if use_te is None:
        return HAVE_TE
    if use_te and not HAVE_TE:
        raise ImportError("use_te=True needs transformer_engine; install it or pass use_te=False")
    return use_te


def _norm(use_te: bool):
    """RMSNorm: Transformer Engine's, or ours (Megatron-Core's local one refuses sequence parallelism)."""
    return _backend(use_te).layer_norm(rms_norm=True) if use_te else RMSNorm


def _backend(use_te: bool) -> BackendSpecProvider:
    if not use_te:
        return LocalSpecProvider()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def get_dsv4_attention_spec(use_te: bool | None = None) -> ModuleSpec:
    """ModuleSpec of DeepSeekV4HybridSelfAttention with its compressor and indexer.

    The parameter names are the same with Transformer Engine modules and with Megatron-Core's
    local ones. The grouped output projection is this package's own module in both cases.
    """
    if _resolve_use_te(use_te):
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELinear,
            TENorm,
            TERowParallelLinear,
        )

        replicated_linear, column_parallel_linear, row_parallel_linear, norm = (
            TELinear,
            TEColumnParallelLinear,
            TERowParallelLinear,
            TENorm,
        )
    else:
        replicated_linear, column_parallel_linear, row_parallel_linear, norm = (
            ReplicatedLinear,
            ColumnParallelLinear,
            RowParallelLinear,
            RMSNorm,
        )

    def compressor_spec() -> ModuleSpec:
        return ModuleSpec(
            module=DeepSeekV4Compressor,
            submodules=DeepSeekV4CompressorSubmodules(
                linear_kv=replicated_linear, linear_gate=replicated_linear, norm=norm
            ),
        )

    return ModuleSpec(
        module=DeepSeekV4HybridSelfAttention,
        submodules=DeepSeekV4HybridSelfAttentionSubmodules(
            linear_q_down_proj=replicated_linear,
            q_layernorm=norm,
            linear_q_up_proj=column_parallel_linear,
            linear_kv=replicated_linear,
            kv_layernorm=norm,
            linear_o_down_proj=GroupedColumnParallelLinear,
            linear_proj=row_parallel_linear,
            compressor=compressor_spec(),
            indexer=ModuleSpec(
                module=DeepSeekV4Indexer,
                submodules=DeepSeekV4IndexerSubmodules(
                    linear_q_up_proj=column_parallel_linear,
                    linear_weights_proj=column_parallel_linear,
                    compressor=compressor_spec(),
                ),
            ),
        ),
    )


def _moe_builder(config: DeepSeekV4TransformerConfig, use_te: bool, hash_routed: bool):
    if not config.num_moe_experts:
        raise ValueError("every DeepSeek-V4 layer is a mixture of experts; set config.num_moe_experts")
    # TE flavour: TEGroupedMLP experts (the contract's `experts.linear_fc1.weight{e}` names).
    mcore_moe = get_moe_module_spec_for_backend(
        backend=_backend(use_te), num_experts=config.num_moe_experts, moe_grouped_gemm=use_te
    )
    submodules = dataclasses.replace(
        mcore_moe.keywords["submodules"], router=HashRouter if hash_routed else TopKRouter
    )
    return partial(DeepSeekV4MoELayer, submodules=submodules)


def _attention_spec(compress_ratio: int, use_te: bool) -> ModuleSpec:
    spec = get_dsv4_attention_spec(use_te=use_te)
    return dataclasses.replace(spec, params={**spec.params, "compress_ratio": compress_ratio})


def _layer_spec(
    config: DeepSeekV4TransformerConfig,
    compress_ratio: int,
    hash_routed: bool,
    use_te: bool,
) -> ModuleSpec:
    norm = _norm(use_te)
    return ModuleSpec(
        module=DeepSeekV4TransformerLayer,
        submodules=DeepSeekV4LayerSubmodules(
            input_layernorm=norm,
            self_attention=_attention_spec(compress_ratio, use_te),
            pre_mlp_layernorm=norm,
            mlp=_moe_builder(config, use_te, hash_routed),
        ),
    )


def get_dsv4_layer_spec(
    config: DeepSeekV4TransformerConfig, layer_number: int, use_te: bool | None = None
) -> ModuleSpec:
    """Spec of decoder layer `layer_number` (1-based, global): its compress ratio and router kind."""
    if not 1 <= layer_number <= config.num_layers:
        raise ValueError(f"layer_number={layer_number} is outside 1..num_layers={config.num_layers}")
    index = layer_number - 1
    return _layer_spec(
        config,
        compress_ratio=config.compress_ratios[index],
        hash_routed=config.is_hash_layer[index],
        use_te=_resolve_use_te(use_te),
    )


def get_dsv4_decoder_block_spec(
    config: DeepSeekV4TransformerConfig, use_te: bool | None = None
) -> DeepSeekV4BlockSubmodules:
    """Specs of all decoder layers (the block builds its pipeline stage's) and the final norm."""
    use_te = _resolve_use_te(use_te)
    return DeepSeekV4BlockSubmodules(
        layer_specs=[
            _layer_spec(config, ratio, hash_routed, use_te)
            for ratio, hash_routed in zip(config.compress_ratios, config.is_hash_layer)
        ],
        layer_norm=_norm(use_te),
    )


def get_dsv4_mtp_block_spec(
    config: DeepSeekV4TransformerConfig, use_te: bool | None = None
) -> DeepSeekV4MTPBlockSubmodules:
    """Specs of the `mtp_num_layers` MTP layers (sliding-window attention, learned routing)."""
    if not config.mtp_num_layers:
        raise ValueError("config.mtp_num_layers is not set; the model has no MTP block to build")
    use_te = _resolve_use_te(use_te)
    backend = _backend(use_te)
    norm = _norm(use_te)
    layer = ModuleSpec(
        module=DeepSeekV4MTPLayer,
        submodules=DeepSeekV4MTPLayerSubmodules(
            enorm=norm,
            hnorm=norm,
            e_proj=backend.column_parallel_linear(),
            h_proj=backend.column_parallel_linear(),
            transformer_layer=_layer_spec(config, SLIDING, hash_routed=False, use_te=use_te),
            layer_norm=norm,
        ),
    )
    return DeepSeekV4MTPBlockSubmodules(layer_specs=[layer] * config.mtp_num_layers)
