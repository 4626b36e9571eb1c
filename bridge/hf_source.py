"""A Hugging Face DeepSeek-V4 checkpoint on disk, addressed by official tensor name, read one tensor at a time.

Opening checks every file (missing, truncated or corrupt safetensors), separates
the FP8/FP4 scales (`X.scale` beside `X.weight`) from the weights, detects the
naming and lists each official tensor's shape and stored format from the file
headers alone. `read(name)` then loads a single tensor, dequantised to fp32 if it
was quantised; transformers' stacked experts are read one expert slice at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config
from bridge.hf_naming import TRANSLATORS, detect_naming
from bridge.quantisation import DEFAULT_FP8_BLOCK, FP4, QuantisationError, SourceFormat, dequantise, source_format
from bridge.safetensors_io import SafetensorsCheckpoint

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
SCALE_SUFFIX = ".scale"
WEIGHT_SUFFIX = ".weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, tensor or key."""


def _data_layout(file: str) -> tuple[int, dict]:
    """(where the data starts, header entries) of a safetensors file."""
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return 8 + header_size, header


def scale_name(weight_name: str) -> str:
    """`layers.0.attn.wq_a.weight` -> `layers.0.attn.wq_a.scale` (where the released checkpoints keep it)."""
    return weight_name.removesuffix(WEIGHT_SUFFIX) + SCALE_SUFFIX


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
        self.fp8_block = tuple((self.config.quantization_config or {}).get("weight_block_size", DEFAULT_FP8_BLOCK))
        try:
            self.checkpoint = SafetensorsCheckpoint(self.path)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        headers = self._read_headers()
        scales = {n for n in headers if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) + WEIGHT_SUFFIX in headers}
        weights = [n for n in headers if n not in scales]
        try:
            self.naming = detect_naming(weights)
        except (KeyError, ValueError) as e:
            raise CheckpointError(str(e.args[0] if e.args else e)) from None
        self.tensors: dict[str, StoredTensor] = {}
        translator = TRANSLATORS[self.naming]
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
        self._slice_cache: tuple[tuple[str, int], torch.Tensor] | None = None
        self._layouts: dict[str, tuple[int, dict]] = {}

    def _read_headers(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        headers = {}
        by_file: dict[str, list[str]] = {}
        for name in self.checkpoint.names():
            by_file.setdefault(self.checkpoint.file_of(name), []).append(name)
        for file, names in by_file.items():
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: missing (listed in the index for tensor {names[0]!r})")
            try:
                with safe_open(file, framework="pt") as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise CheckpointError(f"tensor {name!r}: the index lists it in {file}, which lacks it")
                        tensor_slice = f.get_slice(name)
                        dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
                        if dtype is None:
                            raise CheckpointError(f"tensor {name!r} in {file}: unsupported dtype {tensor_slice.get_dtype()}")
                        headers[name] = (dtype, tuple(tensor_slice.get_shape()))
            except SafetensorError as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        if not headers:
            raise CheckpointError(f"{self.path}: the checkpoint holds no tensors")
        return headers

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

    def _get(self, name: str, expert: int | None = None) -> torch.Tensor:
        """One tensor (or one expert's slice of a stacked one), read with plain file reads.

        Reading through a memory map would leave every byte of the checkpoint resident in
        the process (page cache mapped into it) until the file is closed.
        """
        file = self.checkpoint.file_of(name)
        if file not in self._layouts:
            self._layouts[file] = _data_layout(file)
        data_start, entries = self._layouts[file]
        entry = entries[name]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        if expert is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + expert * row, begin + (expert + 1) * row, shape[1:]
        buffer = bytearray(end - begin)
        with open(file, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"tensor {name!r} in {file}: the file ends inside its data (truncated?)")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def read(self, official: str, dequantised_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, original scale or None): a quantised tensor's values in `dequantised_dtype`, else the stored tensor."""
        stored = self.tensors.get(official)
        if stored is None:
            raise CheckpointError(f"tensor {official!r} is not in the checkpoint at {self.path}")
        if stored.expert is None:
            weight = self._get(stored.name)
            if stored.scale is None:
                return weight, None
            scale = self._get(stored.scale)
            return dequantise(weight, scale, stored.format, dequantised_dtype), scale
        key = (stored.name, stored.expert)
        if self._slice_cache is None or self._slice_cache[0] != key:
            self._slice_cache = (key, self._get(stored.name, stored.expert))
        return self._slice_cache[1].chunk(stored.parts, dim=0)[stored.part], None

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
