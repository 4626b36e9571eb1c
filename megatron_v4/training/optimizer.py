"""The optimizer of a training run, built by Megatron-Core's `get_megatron_optimizer`: AdamW, or Muon for
the hidden weight matrices with AdamW (or Lion) for everything else, as DeepSeek-V4 trains.

Which tensors Muon gets: the DeepSeek-V4 report trains the embedding, the prediction head, the RMSNorm
weights and the static biases and gating factors of the mHC modules with AdamW and every other module
with Muon. Megatron-Core's default split for Muon (`_is_nonlinear_or_embedding` in
`megatron/core/optimizer/emerging_optimizers.py`) sends every 2-D parameter that is not the embedding or
the output layer to Muon; with DeepSeek-V4's parameter names that would also hand Muon the mHC mixing
matrices (`hc_*.fn`, 2-D) and the compressors' absolute position embeddings (`compressor.ape`, 2-D).
`is_muon_matrix` below keeps Muon to the `.weight` matrices of linear layers (attention projections, the
indexer's, the compressors' projections, the routers, shared and routed experts, MTP's e/h projections);
the mHC `fn`/`base`/`scale`, attention sinks, `ape`, norms, embedding and output head go to the scalar
optimizer. (The experts' biases for aux-loss-free balancing and the hash routers' tables are buffers.)

SwiGLU's `linear_fc1` holds [w1; w3] (tensor parallel: each rank's [w1 part; w3 part]); DeepSeek-V4
orthogonalises w1 and w3 as the separate matrices they are, so fc1 weights are tagged for Megatron-Core's
QKV-style split (`is_qkv` / `qkv_split_shapes`, honoured by `TensorParallelMuon.orthogonalize`). Tensor-
parallel matrices are orthogonalised whole: `muon_tp_mode="duplicated"` all-gathers the shards, runs
Newton-Schulz on the full matrix and keeps this rank's slice (Megatron-Core's default, "blockwise", would
orthogonalise each shard on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core.optimizer import OptimizerConfig

OPTIMIZERS = ("adam", "muon", "dist_muon")
"""adam: Megatron-Core's distributed optimizer (AdamW). muon: Muon + scalar AdamW, state replicated over
data-parallel ranks. dist_muon: Megatron-Core's `LayerWiseDistributedOptimizer` (whole tensors spread over
the data-parallel ranks)."""

ADAMW_NAME_PARTS = ("embedding", "output_layer")


def is_muon_matrix(param: torch.nn.Parameter, name: str) -> bool:
    """True for the hidden weight matrices that Muon trains (see the module docstring)."""
    if param.dim() != 2 or not name.endswith(".weight"):
        return False
    if getattr(param, "is_embedding_or_output_parameter", False):
        return False
    return not any(part in name for part in ADAMW_NAME_PARTS)


def uses_distributed_adam(optimizer: str) -> bool:
    """Whether DDP must reduce-scatter gradients for Megatron-Core's `DistributedOptimizer`. Muon's
    optimizers read whole gradients: DDP all-reduces them (`dist_muon` then updates whole tensors layer-wise
    on their owning data-parallel rank and all-gathers them)."""
    return optimizer == "adam"


def optimizer_config(args, dtype: torch.dtype) -> OptimizerConfig:
    """Megatron-Core's `OptimizerConfig` for a run's arguments (Megatron-LM's flag names)."""
    kwargs = dict(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=uses_distributed_adam(args.optimizer),
    )
    if args.optimizer != "adam":
        kwargs.update(
            muon_momentum=args.muon_momentum,
            muon_nesterov=args.muon_nesterov,
            muon_num_ns_steps=args.muon_ns_steps,
            muon_coefficient_type=args.muon_coefficient_type,
            muon_scale_mode=args.muon_scale_mode,
            muon_extra_scale_factor=args.muon_extra_scale_factor,
            muon_scalar_optimizer=args.muon_scalar_optimizer,
            muon_fp32_matmul_prec=args.muon_fp32_matmul_prec
            or ("highest" if dtype == torch.float32 else "medium"),
            muon_tp_mode="duplicated",
            muon_split_qkv=True,
        )
    return OptimizerConfig(**kwargs)


def _tag_glu_halves(model) -> None:
    """Mark each SwiGLU fc1 weight as two matrices (w1 part, w3 part) for Muon's split orthogonalisation."""
    if not model.config.gated_linear_unit:
        return
    for name, param in model.named_parameters():
        if name.endswith("linear_fc1.weight") and param.dim() == 2:
            half = param.shape[0] // 2
            param.is_qkv = True
            param.qkv_split_shapes = [half, half]


@contextlib.contextmanager
def _deepseek_split(name: str, scalar_optimizer: str):
    """Megatron-Core routes an emerging optimizer's non-matrix parameters through the
    `default_param_overrides` of its registry entry (the "optimizer" key may not be overridden through
    `config_overrides`); swap in DeepSeek-V4's split for the duration of one build."""
    from megatron.core.optimizer import emerging_optimizers
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    registry = emerging_optimizers._EMERGING_OPTIMIZERS
    entry = registry[name]
    adamw = ParamWithNamePredicate(name="deepseek_v4_adamw", fn=lambda p, n: not is_muon_matrix(p, n))
    registry[name] = dataclasses.replace(
        entry, default_param_overrides={ParamKey(with_name_predicate=adamw): {"optimizer": scalar_optimizer}}
    )
    try:
        yield
    finally:
        registry[name] = entry


def build_optimizer(model, config: OptimizerConfig):
    """Megatron-Core's optimizer for one DDP-wrapped model chunk: its distributed AdamW, or Muon with
    DeepSeek-V4's matrix / scalar split (layer-wise distributed for "dist_muon")."""
    from megatron.core.optimizer import get_megatron_optimizer

    if config.optimizer == "adam":
        return get_megatron_optimizer(config, [model])
    _tag_glu_halves(model)
    with _deepseek_split(config.optimizer.removeprefix("dist_"), config.muon_scalar_optimizer):
        optimizer = get_megatron_optimizer(config, [model])
    if not config.bf16:
        _wrap_fp32_layer_wise(optimizer, config)
    return optimizer


def _zero_adam_state(opt, config=None) -> None:
    """Adam's moments for every parameter (so that a checkpoint can be loaded into them)."""
    for group in opt.param_groups:
        for param in group["params"]:
            if not opt.state[param]:
                opt.state[param]["exp_avg"] = torch.zeros_like(param.data)
                opt.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


def _wrap_fp32_layer_wise(optimizer, config: OptimizerConfig) -> None:
    """`LayerWiseDistributedOptimizer.__init__` (megatron/core/optimizer/layer_wise_optimizer.py) wraps its
    base torch optimizers in Megatron's optimizer class only for bf16; in fp32 they stay bare and the
    schedules' `scale_loss` and the step fail on them. Give them `FP32Optimizer`, as the non-layer-wise path
    does, and the config that `ChainedOptimizer.__init__` reads from its first child. (Its
    `sharded_state_dict` still expects the bf16 layout: fp32 dist_muon runs cannot save checkpoints.)"""
    from megatron.core.optimizer.emerging_optimizers import OrthogonalizedOptimizer, _eopt_init_state_fn
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    for layer_wise in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
        if not isinstance(layer_wise, LayerWiseDistributedOptimizer):
            continue
        for i, inner in enumerate(layer_wise.chained_optimizers):
            if isinstance(inner, torch.optim.Optimizer):
                init = _eopt_init_state_fn if isinstance(inner, OrthogonalizedOptimizer) else _zero_adam_state
                layer_wise.chained_optimizers[i] = FP32Optimizer(inner, config, init)
        layer_wise.config = config


def muon_managed(optimizer) -> list[torch.nn.Parameter]:
    """The parameters this rank's Muon updates (for tests and logs)."""
    from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon

    found = []
    stack = [optimizer]
    while stack:
        inner = stack.pop()
        if hasattr(inner, "chained_optimizers"):
            stack += inner.chained_optimizers
            continue
        torch_optimizer = inner if isinstance(inner, torch.optim.Optimizer) else inner.optimizer
        if isinstance(torch_optimizer, TensorParallelMuon):
            found += [p for group in torch_optimizer.param_groups for p in group["params"]]
    return found
