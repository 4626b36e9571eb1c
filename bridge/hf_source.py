"""Hugging Face DeepSeek-V4 weights addressed by official tensor name: a checkpoint directory
(`HFSource`) or an in-memory state dict (`InMemorySource`).

Opening a directory checks every file (missing, truncated or corrupt safetensors),
separates the FP8/FP4 scales (`X.scale` beside `X.weight`) from the weights, detects
the naming and lists each official tensor's shape and stored format from the file
headers alone. Both sources answer `read_share(official, part)`: one rank's share of
one official tensor, reading from disk only the rows it needs, also out of
transformers' stacked-expert tensors [E, parts * rows, cols]. FP8/FP4 tensors are
read whole and dequantised first, since their scales cover blocks a share may cut.
Tensors of parts of a release that are not the text model (a draft head's `mtp.*` when
the config declares one, a vision variant's encoder and aligner) are listed apart in
`HFSource.carried`, to be kept byte for byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from bridge import pipeline
from bridge.conversion_plan import WHOLE, Slice
from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config
from bridge.hf_naming import TRANSLATORS, detect_naming
from bridge.quantisation import (
    DEFAULT_FP8_BLOCK,
    FP4,
    QuantisationError,
    SourceFormat,
    dequantise,
    dtype_name,
    scale_companions,
    scale_name,
    source_format,
)
from bridge.safetensors_io import SafetensorsCheckpoint


MTP_PREFIX = "mtp."
DRAFT_HEAD_PREFIXES = (MTP_PREFIX, "model." + MTP_PREFIX)
"""Where a draft head's tensors lie: the MTP namespace, in the official naming or under `model.`."""


def carried_mtp_layers(config: DeepSeekV4HFConfig, official_names) -> int:
    """MTP layers a Megatron-Core model of these weights gets: the config's, if the weights carry them.

    transformers builds and saves no MTP layers, so its checkpoints have none to load.
    """
    return config.num_nextn_predict_layers if any(n.startswith(MTP_PREFIX) for n in official_names) else 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, tensor or key."""


@dataclass(frozen=True)
class StoredTensor:
    """Where an official tensor lives in the checkpoint and how it is stored."""

    name: str
    """Its name in the checkpoint's naming."""
    shape: tuple[int, ...]
    """Its logical (dequantised) shape."""
    format: SourceFormat
    scale: str | None = None
    expert: int | None = None
    """For a stacked-experts tensor: which expert slice..."""
    part: int = 0
    parts: int = 1
    """...and which of its `parts` row blocks."""


class HFSource:
    """The tensors of one Hugging Face checkpoint directory, by official name."""

    def __init__(self, path: str | os.PathLike, config: DeepSeekV4HFConfig | None = None):
        self.path = os.fspath(path)
        try:
            self.config = config or read_hf_config(self.path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.path}: no config.json ({e})") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}/config.json: not valid JSON ({e.msg} at line {e.lineno})") from None
        self.fp8_block = tuple((self.config.quantization_config or {}).get("weight_block_size", DEFAULT_FP8_BLOCK))
        try:
            self.checkpoint = SafetensorsCheckpoint(self.path)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
        headers = {name: (h.dtype, h.shape) for name, h in self.checkpoint.headers.items()}
        if not headers:
            raise CheckpointError(f"{self.path}: the checkpoint holds no tensors")
        scales = scale_companions(headers)
        draft_head = self.config.has_draft_head
        weights = [n for n in headers
                   if n not in scales and not (draft_head and n.startswith(DRAFT_HEAD_PREFIXES))]
        try:
            self.naming = detect_naming(weights)
        except (KeyError, ValueError) as e:
            raise CheckpointError(str(e.args[0] if e.args else e)) from None
        translator = TRANSLATORS[self.naming]
        weights = [n for n in weights if not translator.carries(n)]
        carried_out = set(weights) | {scale_name(n) for n in weights}
        # the tensors of other parts of the release (a draft head, a vision encoder), carried byte for byte
        self.carried = [n for n in headers if n not in carried_out]
        self.tensors: dict[str, StoredTensor] = {}
        for name in weights:
            dtype, shape = headers[name]
            scale = scale_name(name) if scale_name(name) in scales else None
            fmt = self._format(name, dtype, shape, headers[scale] if scale else None)
            logical = (shape[0], shape[1] * 2) if fmt.quant == FP4 else shape
            stand_in = torch.empty(logical, device="meta")
            official = list(translator.to_official([(name, stand_in)]))
            if len(official) == 1:
                (official_name, _), = official
                self.tensors[official_name] = StoredTensor(name, tuple(logical), fmt, scale)
                continue
            if scale is not None:
                raise CheckpointError(f"tensor {name!r}: quantised stacked experts are not supported; unstack them first")
            parts = len(official) // shape[0]
            for i, (official_name, piece) in enumerate(official):
                self.tensors[official_name] = StoredTensor(
                    name, tuple(piece.shape), fmt, None, expert=i // parts, part=i % parts, parts=parts
                )
    def _format(self, name, dtype, shape, scale_header) -> SourceFormat:
        weight = torch.empty(shape, dtype=dtype, device="meta")
        scale = None if scale_header is None else torch.empty(scale_header[1], dtype=scale_header[0], device="meta")
        try:
            return source_format(name, weight, scale, self.fp8_block)
        except QuantisationError as e:
            raise CheckpointError(str(e)) from None

    def names(self) -> list[str]:
        return list(self.tensors)

    def file_of(self, official: str) -> str:
        return self.checkpoint.file_of(self.tensors[official].name)

    def _stored(self, official: str) -> StoredTensor:
        stored = self.tensors.get(official)
        if stored is None:
            raise CheckpointError(f"tensor {official!r} is not in the checkpoint at {self.path}")
        return stored

    def read(
        self, official: str, dequantised_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, original scale or None): a quantised tensor's values in `dequantised_dtype`, else the stored
        tensor."""
        stored = self._stored(official)
        if stored.scale is None:
            return self._read_stored(official, stored, WHOLE), None
        scale = self.checkpoint.get(stored.scale)
        return dequantise(self.checkpoint.get(stored.name), scale, stored.format, dequantised_dtype), scale

    def read_share(self, official: str, part: Slice = WHOLE) -> torch.Tensor:
        """`part` of official tensor `official`, reading only its bytes unless it is quantised."""
        stored = self._stored(official)
        if stored.scale is not None:
            values, _ = self.read(official)
            return part.of(values, official)
        return self._read_stored(official, stored, part)

    def _read_stored(self, official: str, stored: StoredTensor, part: Slice) -> torch.Tensor:
        if part.glu:
            raise ValueError(f"{official}: a glu share spans w1 and w3; read each of them")
        ranges = [slice(0, extent) for extent in stored.shape]
        if not part.whole:
            length = part.length(stored.shape[part.dim], official)
            ranges[part.dim] = slice(part.rank * length, (part.rank + 1) * length)
        if stored.expert is None:
            return self.checkpoint.get(stored.name, tuple(ranges))
        first_row = stored.part * stored.shape[0]
        ranges[0] = slice(first_row + ranges[0].start, first_row + ranges[0].stop)
        return self.checkpoint.get(stored.name, (slice(stored.expert, stored.expert + 1), *ranges))[0]

    def format_of(self, official: str) -> SourceFormat | None:
        """How the checkpoint stores `official` (None if it does not have it)."""
        stored = self.tensors.get(official)
        return None if stored is None else stored.format

    def original_scale(self, official: str) -> torch.Tensor | None:
        """The stored scale of a quantised tensor (None for an unquantised one)."""
        stored = self.tensors.get(official)
        return None if stored is None or stored.scale is None else self.checkpoint.get(stored.scale)

    def stored_bytes(self, official: str) -> int:
        """Bytes the tensor (and its scale) occupy in the checkpoint."""
        stored = self.tensors[official]
        numel = 1
        for n in stored.shape:
            numel *= n
        if stored.format.quant == FP4:
            return numel // 2 + numel // 32
        element = torch.empty((), dtype=stored.format.torch_dtype).element_size()
        extra = 0
        if stored.scale:
            block = stored.format.block
            extra = -(-stored.shape[0] // block[0]) * -(-stored.shape[1] // block[1]) * (
                4 if stored.format.scale_dtype == "float32" else 1)
        return numel * element + extra


class InMemorySource:
    """The tensors of an in-memory state dict (e.g. a `DeepseekV4ForCausalLM`'s) by official name.

    FP8/FP4 weights with their `.scale` companions are dequantised (their formats are not kept); shares
    are views.
    """

    def __init__(self, state, config: DeepSeekV4HFConfig):
        self.config = config
        scales = scale_companions(state)
        self.naming = detect_naming(name for name in state if name not in scales)
        self.tensors = dict(pipeline.to_official(pipeline.dequantise(state.items()), self.naming))

    def names(self) -> list[str]:
        return list(self.tensors)

    def format_of(self, official: str) -> SourceFormat | None:
        tensor = self.tensors.get(official)
        return None if tensor is None else SourceFormat(dtype_name(tensor.dtype))

    def original_scale(self, official: str) -> None:
        return None

    def read_share(self, official: str, part: Slice = WHOLE) -> torch.Tensor:
        tensor = self.tensors.get(official)
        if tensor is None:
            raise KeyError(f"the source has no tensor {official!r}")
        return part.of(tensor, official)
