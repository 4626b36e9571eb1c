"""Reading and writing the `config.json` of DeepSeek-V4 Hugging Face checkpoints.

Two config flavours exist: the *official* one shipped with the released
checkpoints (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`,
`rope_scaling`) and the *transformers* one written by
`DeepseekV4Config.save_pretrained` (`layer_types`, `compress_rates`,
`mlp_layer_types`, `partial_rotary_factor`, `rope_parameters`). Both are read
into one `DeepSeekV4HFConfig`; every key of the file must be understood, so a
checkpoint of a design this project does not build fails loudly, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.runtime import layout

OFFICIAL = "official"
TRANSFORMERS = "transformers"

# compress ratio <-> transformers layer type
LAYER_TYPE_OF_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
RATIO_OF_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_OF_RATIO.items()}
HASH_MOE, MOE = "hash_moe", "moe"


@dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency rescaling of the compressed layers' RoPE (no mscale: attention factor 1)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class DeepSeekV4HFConfig:
    """A DeepSeek-V4 checkpoint's architecture, independent of the config flavour it was read from."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    """One per decoder layer (the MTP layers are sliding-window, ratio 0)."""
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float
    compress_rope_theta: float
    yarn: YarnScaling | None
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    num_routed_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    swiglu_limit: float
    rms_norm_eps: float
    max_position_embeddings: int
    num_nextn_predict_layers: int
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    initializer_range: float = 0.02
    dtype: str | None = None
    """The checkpoint's declared dtype (`torch_dtype` / `dtype`), for information."""
    quantization_config: Mapping[str, Any] | None = None
    expert_dtype: str | None = None
    flavour: str = OFFICIAL
    """Which config flavour this was read from."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys carried through unchanged, in the source's order: metadata (architectures,
    transformers_version, ...), legacy keys at their neutral values and the carried parts' keys."""
    mtp_compress_ratios: tuple[int, ...] | None = None
    """The official `compress_ratios` entries past the decoder layers, as the config gave them."""

    @property
    def has_draft_head(self) -> bool:
        """A release with a draft head (`dspark_*` keys): its `mtp.*` tensors are carried, not built."""
        return declares_draft_head(self.extra)


# --- the key tables -------------------------------------------------------------------------------
# hf key -> DeepSeekV4HFConfig field, identical in both flavours.
SHARED_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "sliding_window",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "n_routed_experts": "num_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "n_shared_experts": "num_shared_experts",
    "moe_intermediate_size": "moe_intermediate_size",
    "routed_scaling_factor": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "num_nextn_predict_layers": "num_nextn_predict_layers",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "initializer_range": "initializer_range",
    "quantization_config": "quantization_config",
    "expert_dtype": "expert_dtype",
}

# Keys whose value is a design choice this project supports only one way: value -> accepted values.
FIXED_KEYS = {
    "model_type": ("deepseek_v4",),
    "num_key_value_heads": (1,),
    "scoring_func": ("sqrtsoftplus",),
    "topk_method": ("noaux_tc",),
    "hidden_act": ("silu",),
    "norm_topk_prob": (True,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "tie_word_embeddings": (False,),
    "attention_dropout": (0, 0.0),
}

# Keys that describe the file or inference settings, not the architecture: kept in `extra`.
# `auto_map`, `_name_or_path`, `return_dict`, `output_*` are transformers' `PretrainedConfig` attributes.
METADATA_KEYS = (
    "architectures",
    "transformers_version",
    "use_cache",
    "pad_token_id",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "auto_map",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
)

# DeepSeek-V3 keys that some DeepSeek-V4 configs still carry: accepted (and kept in `extra`) only at the
# value that switches them off; in DeepSeek-V4 every layer is MoE, routing has no expert groups and
# attention has no kv LoRA.
LEGACY_KEYS = {
    "first_k_dense_replace": (0,),
    "n_group": (1,),
    "topk_group": (1,),
    "kv_lora_rank": (None,),
}

# Config keys of parts this bridge carries without building them, by name prefix: the draft head of
# DeepSeek-V4-Flash-0731 and the DSpark releases (`dspark_*`) and the vision variant's encoder and
# aligner. Their meaning is not read: they are kept in `extra` and written back as they came.
DRAFT_HEAD_KEY_PREFIX = "dspark_"
CARRIED_KEY_PREFIXES = (DRAFT_HEAD_KEY_PREFIX, "vision", "aligner")
DTYPE_KEYS = ("torch_dtype", "dtype")

# Keys only one flavour has; seeing one of them decides the flavour.
OFFICIAL_ONLY_KEYS = ("compress_ratios", "num_hash_layers", "rope_scaling")
TRANSFORMERS_ONLY_KEYS = (
    "layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor", "rope_parameters"
)
# transformers writes its runtime attribute `qk_rope_head_dim` too; in its flavour it must agree.
FLAVOUR_KEYS = {
    OFFICIAL: OFFICIAL_ONLY_KEYS + ("qk_rope_head_dim",),
    TRANSFORMERS: TRANSFORMERS_ONLY_KEYS + ("qk_rope_head_dim",),
}

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
# What may stand inside `rope_scaling` (official) and `rope_parameters[...]` (transformers).
ROPE_SCALING_KEYS = ("type", "rope_type", *YARN_KEYS)
ROPE_PARAMETER_KEYS = (*ROPE_SCALING_KEYS, "rope_theta", "partial_rotary_factor", "attention_factor")
SUPPORTED_QUANT_METHODS = ("fp8",)
# `quantization_config` of the released configs; transformers' flavour adds `expert_dtype` inside it.
QUANTIZATION_KEYS = {
    "quant_method": SUPPORTED_QUANT_METHODS,
    "fmt": ("e4m3",),
    "activation_scheme": ("dynamic",),
    "scale_fmt": None,
    "weight_block_size": None,
    "expert_dtype": None,
}


class UnsupportedConfigError(ValueError):
    """The config describes something this project does not build."""


def config_flavour(raw: Mapping[str, Any]) -> str:
    """`"official"` or `"transformers"`, from which flavour-specific keys a config dict has."""
    official = [k for k in OFFICIAL_ONLY_KEYS if k in raw]
    transformers = [k for k in TRANSFORMERS_ONLY_KEYS if k in raw]
    if official and transformers:
        raise UnsupportedConfigError(
            f"config mixes official keys {official} with transformers keys {transformers}; "
            "a DeepSeek-V4 config.json uses one flavour"
        )
    if transformers:
        return TRANSFORMERS
    if official:
        return OFFICIAL
    raise UnsupportedConfigError(
        "config has neither `compress_ratios` (official DeepSeek-V4 flavour) nor `layer_types` "
        "(transformers flavour); is this a DeepSeek-V4 config.json?"
    )


def load_config_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The raw dict of a config: a dict itself, a `config.json` path, or a checkpoint directory."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}; pass a checkpoint directory or a config.json path")
    with open(path) as f:
        return json.load(f)


def read_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> DeepSeekV4HFConfig:
    """Read a DeepSeek-V4 config (dict, `config.json` path or checkpoint directory) of either flavour."""
    raw = load_config_dict(source)
    flavour = config_flavour(raw)
    _check_known_keys(raw, flavour)
    _check_fixed_values(raw)
    _check_nested_keys(raw)
    values: dict[str, Any] = {f: raw[k] for k, f in SHARED_KEYS.items() if k in raw}
    values.update(FLAVOUR_READERS[flavour](raw))
    values["dtype"] = next((raw[k] for k in DTYPE_KEYS if raw.get(k) is not None), None)
    values["extra"] = {k: v for k, v in raw.items() if _carried_key(k)}
    values["flavour"] = flavour
    return _validated(values)


def declares_draft_head(keys) -> bool:
    """Whether config keys `keys` include a draft head's (`dspark_*`)."""
    return any(key.startswith(DRAFT_HEAD_KEY_PREFIX) for key in keys)


def _carried_key(key: str) -> bool:
    """A key kept as it came, its meaning not read (see `DeepSeekV4HFConfig.extra`)."""
    return key in METADATA_KEYS or key in LEGACY_KEYS or key.startswith(CARRIED_KEY_PREFIXES)


def _check_known_keys(raw: Mapping[str, Any], flavour: str) -> None:
    known = set(SHARED_KEYS) | set(FIXED_KEYS) | set(DTYPE_KEYS) | set(FLAVOUR_KEYS[flavour])
    for key in raw:
        if key not in known and not _carried_key(key):
            raise UnsupportedConfigError(
                f"unsupported key {key!r} in a {flavour}-flavour DeepSeek-V4 config; this bridge does not "
                "know what it changes in the model (remove it if it is metadata, or extend bridge/hf_config.py)"
            )


def _check_fixed_values(raw: Mapping[str, Any]) -> None:
    for key, accepted in {**FIXED_KEYS, **LEGACY_KEYS}.items():
        if key in raw and raw[key] not in accepted:
            raise UnsupportedConfigError(
                f"unsupported value {key}={raw[key]!r}; DeepSeek-V4 as built here needs one of {list(accepted)}"
            )


def _check_nested_keys(raw: Mapping[str, Any]) -> None:
    """The dicts inside a config hold only keys this bridge reads, quantization_config only known values."""
    _check_dict_keys(raw.get("rope_scaling"), ROPE_SCALING_KEYS, "rope_scaling")
    for part, params in (raw.get("rope_parameters") or {}).items():
        if part not in ("main", "compress"):
            raise UnsupportedConfigError(
                f"unsupported rope_parameters entry {part!r}; DeepSeek-V4 has 'main' and 'compress'"
            )
        _check_dict_keys(params, ROPE_PARAMETER_KEYS, f"rope_parameters[{part!r}]")
    quant = raw.get("quantization_config")
    if not quant:
        return
    _check_dict_keys(quant, QUANTIZATION_KEYS, "quantization_config")
    for key, accepted in QUANTIZATION_KEYS.items():
        given = key in quant or key == "quant_method"  # quant_method is the one that must be given
        if accepted is not None and given and quant.get(key) not in accepted:
            raise UnsupportedConfigError(
                f"unsupported quantization_config {key}={quant.get(key)!r}; DeepSeek-V4 checkpoints use "
                f"{list(accepted)}"
            )


def _check_dict_keys(d: Mapping[str, Any] | None, known, where: str) -> None:
    unknown = [key for key in (d or {}) if key not in known]
    if unknown:
        raise UnsupportedConfigError(
            f"unsupported key {unknown[0]!r} in {where}; this bridge does not know what it changes in the model"
        )


def _read_official(raw: Mapping[str, Any]) -> dict[str, Any]:
    num_layers = _required(raw, "num_hidden_layers")
    draft_head = declares_draft_head(raw)
    ratios = list(raw["compress_ratios"])
    if len(ratios) < num_layers:
        raise UnsupportedConfigError(
            f"compress_ratios has {len(ratios)} entries for num_hidden_layers={num_layers}; "
            "it needs one per layer (plus the MTP layers')"
        )
    # Entries past the decoder layers belong to the MTP layers (and padding in some releases); a draft
    # head's are carried as they are.
    mtp_ratios = ratios[num_layers:]
    if any(mtp_ratios) and not draft_head:
        raise UnsupportedConfigError(
            f"compress_ratios gives the MTP layers ratios {mtp_ratios}; DeepSeek-V4 MTP layers are "
            "sliding-window only (ratio 0)"
        )
    return dict(
        compress_ratios=tuple(ratios[:num_layers]),
        mtp_compress_ratios=tuple(mtp_ratios),
        num_hash_layers=_required(raw, "num_hash_layers"),
        qk_rope_head_dim=_required(raw, "qk_rope_head_dim"),
        yarn=_yarn_from_dict(raw.get("rope_scaling"), "rope_scaling"),
    )


def _read_transformers(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {**_transformers_layer_schedule(raw), **_transformers_rope(raw)}


def _transformers_layer_schedule(raw: Mapping[str, Any]) -> dict[str, Any]:
    """compress_ratios and num_hash_layers from layer_types, compress_rates and mlp_layer_types."""
    default_rates = {t: r for t, r in RATIO_OF_LAYER_TYPE.items() if r}
    rates = {**default_rates, **(raw.get("compress_rates") or {})}
    for layer_type, rate in rates.items():
        if RATIO_OF_LAYER_TYPE.get(layer_type) != rate:
            raise UnsupportedConfigError(
                f"unsupported compress_rates[{layer_type!r}]={rate}; DeepSeek-V4 uses {default_rates}"
            )
    layer_types = _required(raw, "layer_types")
    unknown = sorted({t for t in layer_types if t not in RATIO_OF_LAYER_TYPE})
    if unknown:
        raise UnsupportedConfigError(f"unsupported layer_types {unknown}; expected {list(RATIO_OF_LAYER_TYPE)}")
    # Without mlp_layer_types transformers makes the first 3 layers hash-routed; so do we.
    mlp_types = list(raw.get("mlp_layer_types") or [HASH_MOE] * min(3, len(layer_types)))
    num_hash = 0
    while num_hash < len(mlp_types) and mlp_types[num_hash] == HASH_MOE:
        num_hash += 1
    if any(t != MOE for t in mlp_types[num_hash:]):
        raise UnsupportedConfigError(
            f"unsupported mlp_layer_types {mlp_types}; hash_moe layers must come first, then moe layers"
        )
    return dict(compress_ratios=tuple(RATIO_OF_LAYER_TYPE[t] for t in layer_types), num_hash_layers=num_hash)


def _transformers_rope(raw: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE dims, bases and YaRN from partial_rotary_factor and rope_parameters {"main", "compress"}."""
    rope = raw.get("rope_parameters") or {}
    main, compress = rope.get("main") or {}, rope.get("compress") or {}
    factor = raw.get("partial_rotary_factor", compress.get("partial_rotary_factor", 0.125))
    rope_dim = round(_required(raw, "head_dim") * factor)
    if "qk_rope_head_dim" in raw and raw["qk_rope_head_dim"] != rope_dim:
        raise UnsupportedConfigError(
            f"qk_rope_head_dim={raw['qk_rope_head_dim']} disagrees with partial_rotary_factor*head_dim={rope_dim}"
        )
    if main.get("rope_type", "default") != "default":
        raise UnsupportedConfigError(
            f"unsupported rope_parameters['main'] rope_type={main['rope_type']!r}; sliding layers use plain RoPE"
        )
    compress_type = compress.get("rope_type", compress.get("type", "default"))
    if compress_type not in ("yarn", "default"):
        raise UnsupportedConfigError(f"unsupported rope_parameters['compress'] rope_type={compress_type!r}")
    if compress_type == "yarn" and compress.get("attention_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(
            f"unsupported rope_parameters['compress'] attention_factor={compress['attention_factor']}; "
            "DeepSeek-V4's YaRN does not scale attention (attention_factor 1.0)"
        )
    return dict(
        qk_rope_head_dim=rope_dim,
        rope_theta=main.get("rope_theta", raw.get("rope_theta", 10000.0)),
        compress_rope_theta=compress.get("rope_theta", raw.get("compress_rope_theta", 160000.0)),
        yarn=_yarn_from_dict(compress, "rope_parameters['compress']") if compress_type == "yarn" else None,
    )


FLAVOUR_READERS = {OFFICIAL: _read_official, TRANSFORMERS: _read_transformers}


def _required(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw:
        raise UnsupportedConfigError(f"config lacks {key!r}; a DeepSeek-V4 config.json must give it")
    return raw[key]


def _yarn_from_dict(d: Mapping[str, Any] | None, where: str) -> YarnScaling | None:
    if not d:
        return None
    kind = d.get("type", d.get("rope_type"))
    if kind != "yarn":
        raise UnsupportedConfigError(f"unsupported {where} type {kind!r}; DeepSeek-V4 uses YaRN or no scaling")
    missing = [k for k in YARN_KEYS if k not in d]
    if missing:
        raise UnsupportedConfigError(f"{where} lacks {missing}; YaRN needs {list(YARN_KEYS)}")
    return YarnScaling(**{k: d[k] for k in YARN_KEYS})


def _validated(values: dict[str, Any]) -> DeepSeekV4HFConfig:
    required = [f.name for f in dataclasses.fields(DeepSeekV4HFConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        hf_names = {v: k for k, v in SHARED_KEYS.items()}
        raise UnsupportedConfigError(
            f"config lacks {[hf_names.get(m, m) for m in missing]}; a DeepSeek-V4 config.json must give them"
        )
    cfg = DeepSeekV4HFConfig(**values)
    if len(cfg.compress_ratios) != cfg.num_layers:
        raise UnsupportedConfigError(
            f"{len(cfg.compress_ratios)} layer types for num_hidden_layers={cfg.num_layers}; give one per layer"
        )
    return cfg


# --- towards Megatron-Core ------------------------------------------------------------------------
def transformer_config_kwargs(cfg: DeepSeekV4HFConfig, mtp_num_layers: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `megatron_v4.config.DeepSeekV4TransformerConfig` for this architecture.

    The parallel layout (`layout.config_kwargs()`), dtypes and `use_cpu_initialization`
    are the caller's. `mtp_num_layers` defaults to the config's `num_nextn_predict_layers`.
    """
    yarn = cfg.yarn
    mtp = cfg.num_nextn_predict_layers if mtp_num_layers is None else mtp_num_layers
    return dict(
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=1,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.moe_intermediate_size,
        layernorm_epsilon=cfg.rms_norm_eps,
        init_method_std=cfg.initializer_range,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        sliding_window=cfg.sliding_window,
        compress_ratios=list(cfg.compress_ratios),
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        yarn_factor=yarn.factor if yarn else None,
        yarn_original_max_position_embeddings=yarn.original_max_position_embeddings if yarn else 65536,
        yarn_beta_fast=yarn.beta_fast if yarn else 32.0,
        yarn_beta_slow=yarn.beta_slow if yarn else 1.0,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        num_hash_layers=cfg.num_hash_layers,
        swiglu_limit=cfg.swiglu_limit,
        num_moe_experts=cfg.num_routed_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.num_shared_experts * cfg.moe_intermediate_size or None,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_enable_expert_bias=True,
        moe_router_dtype="fp32",
        mtp_num_layers=mtp or None,
    )


def transformer_config(
    cfg: DeepSeekV4HFConfig, dtype: torch.dtype = torch.bfloat16, mtp_num_layers: int | None = None, **overrides
) -> DeepSeekV4TransformerConfig:
    """The `DeepSeekV4TransformerConfig` of architecture `cfg` for the current parallel layout.

    The one way from a Hugging Face architecture to a Megatron-Core config: the bridge,
    checkpoint conversion and training all build theirs here. `overrides` win.
    """
    kwargs = transformer_config_kwargs(cfg, mtp_num_layers=mtp_num_layers)
    kwargs.update(layout().config_kwargs())
    kwargs.update(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return DeepSeekV4TransformerConfig(**kwargs)


# --- back to Hugging Face -------------------------------------------------------------------------
def official_config_dict(cfg: DeepSeekV4HFConfig) -> dict[str, Any]:
    """The official-flavour `config.json` contents for this architecture."""
    yarn = cfg.yarn
    out: dict[str, Any] = {
        "architectures": list(cfg.extra.get("architectures", ["DeepseekV4ForCausalLM"])),
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "num_key_value_heads": 1,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "tie_word_embeddings": False,
    }
    out.update({k: getattr(cfg, f) for k, f in SHARED_KEYS.items() if getattr(cfg, f) is not None})
    out.update(
        compress_ratios=list(cfg.compress_ratios) + list(_mtp_ratios(cfg)),
        num_hash_layers=cfg.num_hash_layers,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
    )
    if yarn is not None:
        out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(yarn)}
    if cfg.dtype is not None:
        out["torch_dtype"] = cfg.dtype
    out.update({k: v for k, v in cfg.extra.items() if k != "architectures"})
    return out


def _mtp_ratios(cfg: DeepSeekV4HFConfig) -> tuple[int, ...]:
    """The MTP layers' `compress_ratios` entries: the source's while they cover the MTP layers, else one
    sliding-window 0 per MTP layer (at least one, as the released configs have)."""
    if cfg.mtp_compress_ratios is not None and len(cfg.mtp_compress_ratios) >= cfg.num_nextn_predict_layers:
        return cfg.mtp_compress_ratios
    return (0,) * max(cfg.num_nextn_predict_layers, 1)


def write_official_config(cfg: DeepSeekV4HFConfig, out_dir: str | os.PathLike) -> str:
    """Write `config.json` (official flavour) into `out_dir`; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.json")
    with open(path, "w") as f:
        json.dump(official_config_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def transformers_config(cfg: DeepSeekV4HFConfig):
    """A `transformers.DeepseekV4Config` for this architecture (transformers folds the official keys in)."""
    from transformers import DeepseekV4Config

    official = official_config_dict(cfg)
    # the transformers model is built unquantised: the bridge hands it dequantised weights
    official.pop("quantization_config", None)
    official.pop("expert_dtype", None)
    return DeepseekV4Config(**official)
