"""Weight sync for RL trainers: a live model's weights out as Hugging Face tensors, and back in place.

An RL trainer pushes its weights to an inference engine every step, and may receive
weights back. `AutoBridge.export_hf_weights` and `AutoBridge.load_hf_weights` do it
with the steps below, around the same conversion plan as every other route:

- export: gather (`bridge.gather`) -> split into official tensors -> `in_export_dtype`
  (as held, bf16, or re-quantised to the source's FP8/FP4) -> rename -> `buckets`;
- load: `pairs` (a dict, pairs or buckets) -> dequantise -> `to_official` (any naming,
  told per tensor) -> `load_in_place`, each rank copying its share into the tensors it
  already has, so optimizers and DDP buffers that point at them see the new values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from bridge import pipeline
from bridge.conversion_plan import ConversionPlan, RankPosition
from bridge.convert import EXPORT_DTYPES, export_form
from bridge.hf_naming import TRANSLATORS
from bridge.mcore_naming import UnknownTensorError
from bridge.quantisation import release_plain_format, requantise, scale_name
from bridge.rank_tensors import rank_tensors

Items = Iterable[tuple[str, torch.Tensor]]
Bucket = list[tuple[str, torch.Tensor]]


# --- export ---------------------------------------------------------------------------------------
def in_export_dtype(items: Items, dtype: str, source) -> Iterator[tuple[str, torch.Tensor]]:
    """Official tensors in the form `export_checkpoint` writes for `dtype` (`EXPORT_DTYPES`): "source"
    re-quantises each FP8/FP4 tensor of `source` (keeping each block's original scale where it still gives
    the values exactly) and yields its `.scale` after it; "bf16" gives them as bf16. Other tensors take the
    dtype the source stores them in (the release's, for a tensor the source lacks)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use None (as the model holds them) or one of {EXPORT_DTYPES}")
    for official, tensor in items:
        fmt = source.format_of(official) or release_plain_format(official, tensor.dtype)
        form = export_form(official, fmt, dtype)
        if isinstance(form, torch.dtype):
            yield official, tensor.to(form)
            continue
        stored, scale, _ = requantise(tensor.contiguous(), form, source.original_scale(official))
        yield official, stored.view(form.torch_dtype)
        yield scale_name(official), scale


def buckets(items: Items, bucket_bytes: int) -> Iterator[Bucket]:
    """Consecutive tensors grouped into lists of at most `bucket_bytes` (a bigger tensor goes alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}: give a positive size, or None for one tensor at a time")
    bucket, size = [], 0
    for name, tensor in items:
        if bucket and size + tensor.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


# --- load -----------------------------------------------------------------------------------------
def pairs(tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from a mapping, an iterable of pairs, or an iterable of buckets (lists or dicts)."""
    if isinstance(tensors, Mapping):
        yield from tensors.items()
        return
    for item in tensors:
        if isinstance(item, Mapping):
            yield from item.items()
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            yield from item


def to_official(items: Items) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of any Hugging Face naming, each told by its own name, renamed to official names."""
    for name, tensor in items:
        naming = next((n for n, translator in TRANSLATORS.items() if translator.knows(name)), None)
        if naming is None:
            raise UnknownTensorError(f"tensor {name!r} is not a DeepSeek-V4 tensor name of any naming")
        yield from TRANSLATORS[naming].to_official([(name, tensor)])


def load_in_place(
    chunks: list[torch.nn.Module],
    plan: ConversionPlan,
    num_experts: int,
    tensors,
    model_tensors: set[str],
    strict: bool = True,
) -> None:
    """Copy this rank's share of each given tensor into the model's own tensors.

    `model_tensors` are the official names of the whole model (every rank's): a name
    outside it is refused; one another rank holds is skipped. With `strict`, every
    tensor this rank holds must be given.
    """
    ranks = RankPosition.current()
    destinations: dict[str, list] = {}
    for chunk in chunks:
        for entry, target in rank_tensors(chunk, plan, num_experts, ranks):
            for index, official in enumerate(entry.plan.official):
                destinations.setdefault(official, []).append((entry, target, index))
    dtype = chunks[0].config.params_dtype
    given = set()
    with torch.no_grad():
        for official, tensor in to_official(pipeline.dequantise(pairs(tensors), dtype)):
            if official not in model_tensors:
                raise UnknownTensorError(
                    f"tensor {official!r} (official name) is not a tensor of this model; check the config "
                    "(layers, experts, MTP) matches the weights sent"
                )
            for entry, target, index in destinations.get(official, ()):
                share = entry.plan.source_share(entry.slice).of(tensor, official)
                destination = entry.plan.block(target, index)
                if tuple(share.shape) != tuple(destination.shape):
                    raise ValueError(
                        f"tensor {official!r}: shape {tuple(tensor.shape)} gives this rank a share of "
                        f"{tuple(share.shape)}, but {entry.local_name} holds {tuple(destination.shape)} of it"
                    )
                destination.copy_(share)
            given.add(official)
    missing = [official for official in destinations if official not in given]
    if strict and missing:
        raise KeyError(
            f"no tensor {missing[0]!r} (official name) among the weights given ({len(missing)} of this rank's "
            "missing); send every tensor, or pass strict=False to update only some"
        )
