"""Reading one rank's slice of an official tensor straight from a checkpoint.

On a safetensors checkpoint, `read(official_name, part)` reads only the bytes of
the slice (`safe_open(...).get_slice`), also out of transformers' stacked-expert
tensors [E, parts * rows, cols], so a rank never loads the rest of a tensor it
splits with others, nor any tensor it does not hold. FP8/FP4 tensors are read
whole and dequantised by `HFSource` before slicing (their scales cover blocks
that a slice may cut through). An in-memory source (a transformers model) is
renamed once and sliced as views.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from bridge import pipeline
from bridge.hf_source import HFSource, StoredTensor
from bridge.rank_tensors import Slice, check_divides, take_slice


class HFSourceSlices:
    """Official-name, slice-wise access to a checkpoint directory (`bridge.hf_source.HFSource`)."""

    def __init__(self, source: HFSource):
        self.source = source
        self._files: dict[str, object] = {}
        """Open files (memory-mapped once; a read touches only its slice's pages)."""

    def read(self, official: str, part: Slice = Slice()) -> torch.Tensor:
        """`part` of official tensor `official`, reading only its bytes unless it is quantised."""
        stored = self.source.tensors.get(official)
        if stored is None:
            raise KeyError(f"the checkpoint at {self.source.path} has no tensor {official!r}")
        if stored.format.quant is not None:
            values, _ = self.source.read(official)
            return take_slice(values, part, official)
        file = self.source.file_of(official)
        if file not in self._files:
            self._files[file] = safe_open(file, framework="pt")
        return self._files[file].get_slice(stored.name)[_index(stored, part, official)]


def _index(stored: StoredTensor, part: Slice, official: str) -> tuple:
    """The safetensors slice index of `part`: a range per dim, led by the expert of a stacked tensor."""
    if part.glu:
        raise ValueError(f"{official}: a glu slice spans w1 and w3; slice each of them")
    ranges = [slice(0, extent) for extent in stored.shape]
    if stored.expert is not None:
        rows = stored.shape[0]
        ranges[0] = slice(stored.part * rows, (stored.part + 1) * rows)
    if not part.whole:
        length = check_divides(stored.shape[part.dim], part, official)
        start = ranges[part.dim].start + part.rank * length
        ranges[part.dim] = slice(start, start + length)
    return tuple(ranges) if stored.expert is None else (stored.expert, *ranges)


class InMemorySlices:
    """Official-name access to an in-memory source (its `items()` renamed once; slices are views)."""

    def __init__(self, weights, naming: str):
        self._tensors = dict(pipeline.to_official(weights.items(), naming))

    def read(self, official: str, part: Slice = Slice()) -> torch.Tensor:
        tensor = self._tensors.get(official)
        if tensor is None:
            raise KeyError(f"the source has no tensor {official!r}")
        (_, tensor), = pipeline.dequantise([(official, tensor)])
        return take_slice(tensor, part, official)


def checkpoint_slices(weights, naming: str):
    """Slice-wise, official-name access to a bridge's weight source."""
    if isinstance(weights, HFSource):
        return HFSourceSlices(weights)
    return InMemorySlices(weights, naming)
