"""Checkpoint conversion as a chain of small streaming steps.

Import (Hugging Face -> Megatron-Core):
    read -> to_official (rename, unstack) -> dequantise -> fuse -> shard -> write
Export (Megatron-Core -> Hugging Face):
    read -> unshard -> split -> from_official (rename, stack) -> write

Every step takes and yields `(name, tensor)` pairs, so a checkpoint flows through
tensor by tensor; only tensors that must be combined (w1 with w3, a layer's
experts for the stacked transformers naming) wait for their partners.

`AutoBridge` loads a parallel model rank by rank instead (`bridge.rank_tensors`,
`bridge.checkpoint_slices`: each rank reads its own slices) and exports it with
`bridge.gather` before `split` and `from_official`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from bridge.hf_naming import OFFICIAL, TRANSLATORS, detect_naming
from bridge.mcore_naming import SEQUENTIAL_EXPERTS, MCoreNaming, RuleMatch, Sharding, detect_expert_layout

Items = Iterable[tuple[str, torch.Tensor]]

QUANTISED_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "int8") if hasattr(torch, name)
)


@dataclass(frozen=True)
class RankPosition:
    """Where this process sits in the tensor-, expert- and expert-tensor-parallel groups."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1

    @classmethod
    def current(cls) -> RankPosition:
        """This process's position in Megatron-Core's parallel state (a single rank if it is not set up)."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
        )

    @property
    def single(self) -> bool:
        return self.tp_size == self.ep_size == self.etp_size == 1


# --- import steps ---------------------------------------------------------------------------------
def to_official(items: Items, naming: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename a Hugging Face naming's tensors to official names."""
    return TRANSLATORS[naming].to_official(items)


def dequantise(items: Items) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn stored tensors into plain floating-point (or integer index) tensors.

    Unquantised tensors pass unchanged. FP8 blocks (float8 weight + `<name>.scale`)
    and FP4 experts (int8-packed + `.scale`) are refused on this in-memory path:
    checkpoint directories are read through `bridge.hf_source.HFSource`, which pairs
    each weight with its scale and dequantises it.
    """
    for name, tensor in items:
        if name.endswith(".scale") or tensor.dtype in QUANTISED_DTYPES:
            raise NotImplementedError(
                f"tensor {name!r} is FP8/FP4-quantised ({tensor.dtype}); in-memory state dicts must be "
                "unquantised: load the checkpoint from its directory (AutoBridge.from_hf_pretrained(dir) or "
                "`python -m bridge import`), which dequantises"
            )
        yield name, tensor


def fuse(items: Items, mcore: MCoreNaming) -> Iterator[tuple[str, torch.Tensor]]:
    """Official tensors -> Megatron-Core tensors, concatenating fused parts (w1, w3) on dim 0."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in items:
        match = mcore.from_official(name)
        if not match.rule.fused:
            yield match.mcore_name, tensor
            continue
        parts = pending.setdefault(match.mcore_name, {})
        parts[match.part] = tensor
        if len(parts) == len(match.rule.official):
            del pending[match.mcore_name]
            yield match.mcore_name, torch.cat([parts[i] for i in range(len(parts))], dim=0)
    if pending:
        name, parts = next(iter(pending.items()))
        missing = [o for i, o in enumerate(mcore.from_mcore(name).official_names) if i not in parts]
        raise KeyError(f"checkpoint lacks {missing}, needed with its partner(s) to build {name!r}")


def shard(
    items: Items, mcore: MCoreNaming, num_experts: int, ranks: RankPosition
) -> Iterator[tuple[str, torch.Tensor]]:
    """Keep this rank's part of each full Megatron-Core tensor (global expert index -> local)."""
    experts_per_rank = _experts_per_rank(num_experts, ranks)
    for name, tensor in items:
        match = mcore.from_mcore(name)
        sharding = match.rule.sharding
        if sharding.by_expert:
            owner, local = divmod(match.values["expert"], experts_per_rank)
            if owner != ranks.ep_rank:
                continue
            match = RuleMatch(match.rule, {**match.values, "expert": local})
            yield match.mcore_name, _split(tensor, sharding, ranks.etp_rank, ranks.etp_size, name)
        else:
            yield name, _split(tensor, sharding, ranks.tp_rank, ranks.tp_size, name)


def _experts_per_rank(num_experts: int, ranks: RankPosition) -> int:
    if num_experts % ranks.ep_size:
        raise ValueError(f"{num_experts} routed experts do not divide over ep={ranks.ep_size} ranks")
    return num_experts // ranks.ep_size


def _split(tensor: torch.Tensor, sharding: Sharding, rank: int, size: int, name: str) -> torch.Tensor:
    if sharding.dim is None or size == 1:
        return tensor
    pieces = tensor.chunk(2, dim=sharding.dim) if sharding.glu else (tensor,)
    for piece in pieces:
        if piece.shape[sharding.dim] % size:
            raise ValueError(
                f"{name}: {piece.shape[sharding.dim]} {sharding.unit} (dim {sharding.dim}) do not divide "
                f"over {size} ranks; choose a parallel size that divides them"
            )
    return torch.cat([piece.chunk(size, dim=sharding.dim)[rank] for piece in pieces], dim=sharding.dim)


# --- export steps ---------------------------------------------------------------------------------
def unshard(
    items: Items, mcore: MCoreNaming, num_experts: int, ranks: RankPosition
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's Megatron-Core tensors -> full tensors with global expert indices."""
    if not ranks.single:
        raise NotImplementedError(
            f"unshard reassembles one rank's tensors only ({ranks}); gather a parallel model with "
            "AutoBridge.export_hf_weights"
        )
    experts_per_rank = _experts_per_rank(num_experts, ranks)
    for name, tensor in items:
        match = mcore.from_mcore(name)
        if match.rule.sharding.by_expert:
            expert = ranks.ep_rank * experts_per_rank + match.values["expert"]
            match = RuleMatch(match.rule, {**match.values, "expert": expert})
        yield match.mcore_name, tensor


def split(items: Items, mcore: MCoreNaming) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron-Core tensors -> official tensors, splitting fused ones on dim 0."""
    for name, tensor in items:
        match = mcore.from_mcore(name)
        official = match.official_names
        pieces = tensor.chunk(len(official), dim=0) if match.rule.fused else (tensor,)
        yield from zip(official, pieces)


def from_official(items: Items, naming: str, num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename official tensors to a Hugging Face naming."""
    return TRANSLATORS[naming].from_official(items, num_experts=num_experts)


# --- whole conversions on plain dicts -------------------------------------------------------------
def mcore_state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor],
    naming: str | None = None,
    expert_layout: str = SEQUENTIAL_EXPERTS,
) -> dict[str, torch.Tensor]:
    """Full (unsharded) Megatron-Core state dict from a Hugging Face state dict of any naming."""
    naming = naming or detect_naming(hf_state)
    mcore = MCoreNaming(expert_layout)
    return dict(fuse(dequantise(to_official(hf_state.items(), naming)), mcore))


def hf_from_mcore_state_dict(
    mcore_state: Mapping[str, torch.Tensor],
    naming: str = OFFICIAL,
    num_experts: int | None = None,
) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (official names by default) from a full Megatron-Core state dict."""
    mcore = MCoreNaming(detect_expert_layout(mcore_state))
    if num_experts is None:
        num_experts = count_experts(mcore_state, mcore)
    official = split(unshard(mcore_state.items(), mcore, num_experts, RankPosition()), mcore)
    return dict(from_official(official, naming, num_experts))


def count_experts(mcore_names: Iterable[str], mcore: MCoreNaming) -> int:
    """Number of routed experts named in a full Megatron-Core state dict."""
    indices = [m.values["expert"] for m in map(mcore.from_mcore, mcore_names) if "expert" in m.values]
    return max(indices) + 1 if indices else 0
