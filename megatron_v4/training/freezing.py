"""Freezing parameters: `requires_grad=False` before DDP and the optimizer are built, so that a frozen
tensor gets no gradient buffer, no optimizer state and no update.

Parameters are named by their Megatron-Core name in the one-rank model (global layer and expert numbers,
whatever this rank's pipeline stage and expert-parallel slice), e.g.
`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`. Patterns are globs (`*` matches any
characters, dots included) or, failing a glob match, regular expressions matched against the whole name.
Official DeepSeek-V4 names (`layers.0.attn.wq_a.weight`, as sliced checkpoints list them in
`frozen_keys.json`) are translated through the bridge's naming tables; a Megatron-Core tensor fused from
several official ones (w1 and w3 in `linear_fc1`) is frozen only when all its parts are listed.
"""

from __future__ import annotations

import fnmatch
import json
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge.mcore_naming import MCoreNaming

LOCAL_EXPERTS = ".mlp.experts.local_experts."


def official_to_mcore(official_name: str) -> tuple[str, tuple[str, ...]]:
    """(Megatron-Core name, every official name fused into it) of an official DeepSeek-V4 tensor name.

    The one call into the bridge's naming tables (`bridge/mcore_naming.py`): adapt here when its API
    changes. Raises KeyError for a name the tables do not know."""
    match = MCoreNaming().from_official(official_name)
    return match.mcore_name, tuple(match.official_names)


def global_names(bare, buffers: bool = False) -> dict[str, torch.Tensor]:
    """This rank's parameters (and buffers) under their one-rank Megatron-Core names: pipeline stages number
    their layers from 0 and expert-parallel ranks their experts from 0; each layer knows its global
    `layer_number`."""
    experts_per_rank = (bare.config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    expert_offset = parallel_state.get_expert_model_parallel_rank() * experts_per_rank
    tensors = list(bare.named_parameters()) + (list(bare.named_buffers()) if buffers else [])
    named = {}
    for name, tensor in tensors:
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            parts[2] = str(bare.decoder.layers[int(parts[2])].layer_number - 1)
        global_name = ".".join(parts)
        if LOCAL_EXPERTS in global_name:
            head, tail = global_name.split(LOCAL_EXPERTS, 1)
            expert, rest = tail.split(".", 1)
            global_name = f"{head}{LOCAL_EXPERTS}{int(expert) + expert_offset}.{rest}"
        named[global_name] = tensor
    return named


def _matcher(pattern: str):
    glob = re.compile(fnmatch.translate(pattern))
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None
    return lambda name: bool(glob.fullmatch(name) or (regex is not None and regex.fullmatch(name)))


def mcore_names_of_official(official_names: list[str], all_mcore_names: set[str]) -> set[str]:
    """Megatron-Core names of the tensors that a list of official names freezes (fused ones only when all
    their parts are listed). Raises ValueError naming the official names that match no tensor."""
    listed = set(official_names)
    frozen, unknown = set(), []
    for name in official_names:
        try:
            mcore, parts = official_to_mcore(name)
        except KeyError:
            unknown.append(name)
            continue
        if mcore not in all_mcore_names:
            unknown.append(name)
        elif listed.issuperset(parts):
            frozen.add(mcore)
    if unknown:
        raise ValueError(
            f"--freeze-file names {len(unknown)} tensor(s) this model does not have, e.g. {unknown[0]!r}"
        )
    return frozen


def all_model_names(bare, buffers: bool = False) -> set[str]:
    """Every parameter's (and buffer's) one-rank name over the whole model (all ranks' names gathered)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(global_names(bare, buffers)))
    return set().union(*gathered)


def read_freeze_file(path: str) -> list[str]:
    with open(path) as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--freeze-file {path}: expected a JSON list of official tensor names")
    return names


def freeze(bare, patterns: list[str], official_names: list[str]) -> set[str]:
    """Set `requires_grad=False` on the parameters named by `patterns` (Megatron-Core names) and by
    `official_names`; returns the frozen one-rank names held by this rank. Every pattern and name must
    match some parameter of the whole model (ValueError otherwise)."""
    everything = all_model_names(bare)
    # Official names may list buffers too (the gate's bias, the hash table): known, never optimised.
    chosen = mcore_names_of_official(official_names, all_model_names(bare, buffers=True)) if official_names else set()
    for pattern in patterns:
        matches = {name for name in everything if _matcher(pattern)(name)}
        if not matches:
            raise ValueError(f"--freeze pattern {pattern!r} matches no parameter (e.g. {min(everything)!r})")
        chosen |= matches
    frozen = set()
    for name, param in global_names(bare).items():
        if name in chosen:
            param.requires_grad_(False)
            frozen.add(name)
    return frozen


def _is_tensor_parallel_replica(param) -> bool:
    """A dense tensor that every tensor-parallel rank holds whole: only tensor-parallel rank 0 counts it."""
    return not getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_rank() > 0


def parameter_counts(bare) -> dict[str, int]:
    """Trainable, frozen and total parameters of the whole model, each tensor counted once: dense tensors
    per (pipeline stage, tensor-parallel slice) over the data-parallel copies; routed experts (split over
    the expert-tensor-parallel ranks, spread over the expert-parallel ranks) over their expert-data-parallel
    copies. The last pipeline stage's copy of the embedding counts once, with the first stage's."""
    dense, expert = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for name, param in bare.named_parameters():
        slot = 0 if param.requires_grad else 1
        if name.startswith("embedding.") and not parallel_state.is_pipeline_first_stage():
            continue  # the last stage's copy of the embedding (for MTP), kept equal to the first stage's
        if LOCAL_EXPERTS in name:
            expert[slot] += param.numel()
        elif not _is_tensor_parallel_replica(param):
            dense[slot] += param.numel()
    totals = dense / parallel_state.get_data_parallel_world_size()
    totals += expert / parallel_state.get_expert_data_parallel_world_size()
    dist.all_reduce(totals)
    trainable, frozen = (int(round(x)) for x in totals.tolist())
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}
