"""Writing safetensors shards whose tensors are known in advance, one tensor at a time.

A safetensors file starts with a header giving every tensor's dtype, shape and
byte range. When the list of tensors is known beforehand (an export knows every
output tensor's name, dtype and shape from the model and the import record), the
headers can be written first and each tensor's bytes appended as it is produced,
so that memory holds one tensor, not one shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from bridge.safetensors_io import INDEX_FILE, SINGLE_FILE

SAFETENSORS_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_bytes` (plus an index)."""

    def __init__(self, out_dir: str, plan: list[PlannedTensor], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for planned in plan:
            if self.shards[-1] and size + planned.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(planned)
            size += planned.nbytes
        count = len(self.shards)
        self.files = [SINGLE_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._order = [(i, p) for i, shard in enumerate(self.shards) for p in shard]
        self._next = 0
        self._stream = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned (all {len(self._order)} planned tensors written)")
        shard, planned = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (planned.name, planned.dtype, planned.shape):
            raise ValueError(
                f"tensor {name!r} {tensor.dtype} {tuple(tensor.shape)} arrived where {planned.name!r} "
                f"{planned.dtype} {planned.shape} was planned"
            )
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._stream.write(memoryview(data.numpy()))
        self._next += 1

    def _open(self, shard: int) -> None:
        self._close_stream()
        header, offset = {}, 0
        for planned in self.shards[shard]:
            header[planned.name] = {"dtype": SAFETENSORS_NAMES[planned.dtype], "shape": list(planned.shape),
                                    "data_offsets": [offset, offset + planned.nbytes]}
            offset += planned.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._stream = open(os.path.join(self.out_dir, self.files[shard]), "wb")
        self._stream.write(len(encoded).to_bytes(8, "little"))
        self._stream.write(encoded)
        self._shard = shard

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            self._stream = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index (for several shards); returns the file names."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"tensor {missing!r} was planned but never written")
        self._close_stream()
        if len(self.files) > 1:
            weight_map = {p.name: self.files[i] for i, p in self._order}
            total = sum(p.nbytes for _, p in self._order)
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
                f.write("\n")
        return self.files
