"""Conversion of in-memory state dicts as a chain of small streaming steps.

Hugging Face -> Megatron-Core:
    dequantise (pair `.scale` companions) -> to_official (rename, unstack) -> fuse
Megatron-Core -> Hugging Face:
    unshard -> split -> from_official (rename, stack)

Every step takes and yields `(name, tensor)` pairs, so a state dict flows through
tensor by tensor; only tensors that must be combined (a weight and its scale, w1
with w3, a layer's experts for transformers' stacked naming) wait for their
partners. How each tensor fuses and splits is the conversion plan's
(`bridge.conversion_plan`), shared with checkpoint conversion and `AutoBridge`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from bridge import quantisation
from bridge.conversion_plan import ConversionPlan, RankPosition, experts_per_rank
from bridge.hf_naming import OFFICIAL, TRANSLATORS, detect_naming
from bridge.mcore_naming import SEQUENTIAL_EXPERTS, detect_expert_form
from bridge.quantisation import DEFAULT_FP8_BLOCK, SCALE_SUFFIX, WEIGHT_SUFFIX, scale_companions, scale_name

Items = Iterable[tuple[str, torch.Tensor]]

QUANTISED_DTYPES = (torch.float8_e4m3fn, torch.int8)
"""Stored dtypes of the released checkpoints' FP8 weights and packed FP4 experts."""


# --- Hugging Face -> Megatron-Core -----------------------------------------------------------------
def dequantise(
    items: Items, dtype: torch.dtype = torch.float32, fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK
) -> Iterator[tuple[str, torch.Tensor]]:
    """FP8/FP4 weights, each paired with its `<name>.scale` companion, dequantised to `dtype`.

    Other tensors pass unchanged. A quantised weight waits for its scale and a `.scale`
    tensor for a quantised weight, in whichever order they come; a `.scale` tensor that
    no quantised weight claims is an ordinary one (transformers' hyper-connection
    `attn_hc.scale`) and comes at the end. `fp8_block` is the FP8 scale block (the
    config's `quantization_config.weight_block_size`).
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}

    def dequantised(weight: str, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        fmt = quantisation.source_format(weight, values, scale, fp8_block)
        return quantisation.dequantise(values, scale, fmt, dtype)

    for name, tensor in items:
        if tensor.dtype in QUANTISED_DTYPES:
            scale = scales.pop(scale_name(name), None)
            if scale is None:
                weights[name] = tensor
            else:
                yield name, dequantised(name, tensor, scale)
        elif name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + WEIGHT_SUFFIX
            values = weights.pop(weight, None)
            if values is None:
                scales[name] = tensor
            else:
                yield weight, dequantised(weight, values, tensor)
        else:
            yield name, tensor
    if weights:
        weight = next(iter(weights))
        raise ValueError(f"tensor {weight!r} is FP8/FP4-quantised but its scale {scale_name(weight)!r} is missing")
    yield from scales.items()


def to_official(items: Items, naming: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename a Hugging Face naming's tensors to official names."""
    return TRANSLATORS[naming].to_official(items)


def mcore_state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor],
    naming: str | None = None,
    expert_form: str = SEQUENTIAL_EXPERTS,
) -> dict[str, torch.Tensor]:
    """Full (unsharded) Megatron-Core state dict from a Hugging Face state dict of any naming (FP8/FP4 too)."""
    if naming is None:
        scales = scale_companions(hf_state)
        naming = detect_naming(name for name in hf_state if name not in scales)
    plan = ConversionPlan(expert_form)
    return dict(plan.fuse(to_official(dequantise(hf_state.items()), naming)))


# --- Megatron-Core -> Hugging Face -----------------------------------------------------------------
def unshard(
    items: Items, plan: ConversionPlan, num_experts: int, ranks: RankPosition
) -> Iterator[tuple[str, torch.Tensor]]:
    """One unsplit rank's Megatron-Core tensors -> the same tensors with global expert indices."""
    if not ranks.single:
        raise NotImplementedError(
            f"unshard reassembles one rank's tensors only ({ranks}); gather a parallel model with "
            "AutoBridge.export_hf_weights"
        )
    per_rank = experts_per_rank(num_experts, ranks.ep_size)
    for name, tensor in items:
        local = plan.tensor(name)
        if local.sharding.by_expert:
            local = plan.renumbered(local, expert=ranks.ep_rank * per_rank + local.match.values["expert"])
        yield local.mcore, tensor


def from_official(items: Items, naming: str, num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename official tensors to a Hugging Face naming."""
    return TRANSLATORS[naming].from_official(items, num_experts=num_experts)


def hf_from_mcore_state_dict(
    mcore_state: Mapping[str, torch.Tensor],
    naming: str = OFFICIAL,
    num_experts: int | None = None,
) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (official names by default) from a full Megatron-Core state dict."""
    plan = ConversionPlan(detect_expert_form(mcore_state))
    if num_experts is None:
        num_experts = count_experts(mcore_state, plan)
    official = plan.split(unshard(mcore_state.items(), plan, num_experts, RankPosition()))
    return dict(from_official(official, naming, num_experts))


def count_experts(mcore_names: Iterable[str], plan: ConversionPlan) -> int:
    """Number of routed experts named in a full Megatron-Core state dict."""
    indices = [p.match.values["expert"] for p in map(plan.tensor, mcore_names) if "expert" in p.match.values]
    return max(indices) + 1 if indices else 0
