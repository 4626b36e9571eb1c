"""The bridge's one safetensors reader and one safetensors writer.

A checkpoint is a single `model.safetensors`, or shards listed by
`model.safetensors.index.json` (the files `transformers`' `save_pretrained` writes).
A safetensors file is an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the bytes
(https://github.com/huggingface/safetensors#format).

Reading parses the headers once and then reads each tensor, or the rows of it that
a caller needs, with plain file reads: a memory map would keep every byte read
resident in the process until the file is closed.

Writing streams: each shard's header is written first and each tensor's bytes are
appended as they come, so memory holds one tensor. When the caller announces every
tensor beforehand (`planned`), shards are laid out from the announcement; otherwise
tensors are held until a shard is full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its file's header describes it."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of its data in `file`."""
    end: int


def _parse_header(file: str) -> dict[str, TensorHeader]:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing")
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError("header length beyond the end of the file")
            entries = json.loads(f.read(length))
        entries.pop("__metadata__", None)
        headers = {}
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
            headers[name] = TensorHeader(file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                         8 + length + begin, 8 + length + end)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{file}: not a readable safetensors file ({e})") from None
    last = max((h.end for h in headers.values()), default=8 + length)
    if last > size:
        raise SafetensorsError(f"{file}: not a readable safetensors file (it ends before its data; truncated?)")
    return headers


def _weight_map(index: str) -> dict[str, str]:
    """Tensor name -> the file the index puts it in; every file must lie in the index's directory."""
    directory = os.path.dirname(index)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {str(name): os.path.join(directory, file) for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SafetensorsError(f"{index}: not a readable index ({type(e).__name__}: {e}); it needs a "
                               "\"weight_map\" of tensor name -> shard file name") from None
    for name, file in files.items():
        if os.path.dirname(os.path.normpath(file)) != os.path.normpath(directory):
            raise SafetensorsError(f"{index}: tensor {name!r} points at {weight_map[name]!r}, outside the "
                                   "checkpoint directory; shards must lie beside the index")
    return files


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint directory (or single file), by name, read on demand."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.directory = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isdir(path):
            index, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
            if os.path.isfile(index):
                files = _weight_map(index)
            elif os.path.isfile(single):
                files = None
                self.headers = _parse_header(single)
            else:
                raise FileNotFoundError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        elif path.endswith(".safetensors"):
            files = None
            self.headers = _parse_header(path)
        else:
            raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a .safetensors file")
        if files is not None:
            self.headers = self._indexed_headers(files)

    @staticmethod
    def _indexed_headers(file_of: dict[str, str]) -> dict[str, TensorHeader]:
        parsed: dict[str, dict[str, TensorHeader]] = {}
        headers = {}
        for name, file in file_of.items():
            if file not in parsed:
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{file}: missing (listed in the index for tensor {name!r})")
                parsed[file] = _parse_header(file)
            if name not in parsed[file]:
                raise KeyError(f"tensor {name!r}: the index lists it in {file}, which lacks it")
            headers[name] = parsed[file][name]
        for file, tensors in parsed.items():
            unindexed = [name for name in tensors if file_of.get(name) != file]
            if unindexed:
                raise SafetensorsError(
                    f"tensor {unindexed[0]!r} is in {file} but the index lists it "
                    f"{'in ' + file_of[unindexed[0]] if unindexed[0] in file_of else 'nowhere'}; "
                    f"fix {INDEX_FILE} or remove the stray tensor")
        return headers

    def names(self) -> list[str]:
        return list(self.headers)

    def file_of(self, name: str) -> str:
        """The file that holds tensor `name`."""
        return self._header(name).file

    def _header(self, name: str) -> TensorHeader:
        header = self.headers.get(name)
        if header is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return header

    def get(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Tensor `name`, or the part `index` selects (a range per leading dim), reading only its bytes.

        The part is read as contiguous runs: one per index of the dims before the last
        narrowed one (one run in all when only the leading dim is narrowed).
        """
        header = self._header(name)
        shape = header.shape
        ranges = [range(*s.indices(n)) for s, n in zip((*index, *[slice(None)] * (len(shape) - len(index))), shape)]
        out_shape = [len(r) for r in ranges]
        narrowed = len(shape)
        while narrowed > 0 and len(ranges[narrowed - 1]) == shape[narrowed - 1]:
            narrowed -= 1
        strides = [header.dtype.itemsize] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        if narrowed == 0:
            runs, run_bytes = [header.begin], header.end - header.begin
        else:
            last = narrowed - 1
            run_bytes = len(ranges[last]) * strides[last]
            starts = [header.begin + ranges[last].start * strides[last]]
            for d in range(last - 1, -1, -1):
                starts = [s + i * strides[d] for i in ranges[d] for s in starts]
            runs = sorted(starts)
        buffer = bytearray(run_bytes * len(runs))
        view = memoryview(buffer)
        with open(header.file, "rb", buffering=0) as f:
            for i, offset in enumerate(runs):
                if os.preadv(f.fileno(), [view[i * run_bytes:(i + 1) * run_bytes]], offset) != run_bytes:
                    raise SafetensorsError(
                        f"tensor {name!r} in {header.file}: the file ends inside its data (truncated?)")
        if not buffer:
            return torch.empty(out_shape, dtype=header.dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(header.dtype).reshape(out_shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, in file order, each read only when the iteration reaches it."""
        for name in sorted(self.headers, key=lambda n: (self.headers[n].file, self.headers[n].begin)):
            yield name, self.get(name)


# --- writing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    """A tensor announced to the writer before its data: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Writes tensors as `model.safetensors`, or as shards of at most `max_shard_bytes` plus an index.

    With `planned` (every tensor's name, dtype and shape, in the order they will be
    written) each tensor goes to disk as it is written; without, tensors are held
    until their shard is full. `close()` returns the file names.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int | None = None,
                 planned: Iterable[PlannedTensor] | None = None):
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.weight_map: dict[str, int] = {}
        self._seen: set[str] = set()
        self.total_bytes = 0
        self.shard_count = 0
        self._stream = None
        self._expected: list[PlannedTensor] = []
        self._held: list[tuple[PlannedTensor, torch.Tensor]] = []
        self._held_bytes = 0
        self._planned = None if planned is None else self._shards_of(list(planned))

    def _full(self, shard_bytes: int, size: int) -> bool:
        return self.max_shard_bytes is not None and shard_bytes > 0 and shard_bytes + size > self.max_shard_bytes

    def _shards_of(self, plan: list[PlannedTensor]) -> Iterator[list[PlannedTensor]]:
        shard, size = [], 0
        for tensor in plan:
            if self._full(size, tensor.nbytes):
                yield shard
                shard, size = [], 0
            shard.append(tensor)
            size += tensor.nbytes
        yield shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        if self._planned is None:
            self._hold(name, tensor)
            return
        if not self._expected:
            shard = next(self._planned, None)
            if shard is None:
                raise ValueError(f"tensor {name!r} was not planned (every planned tensor is written)")
            self._open(shard)
        planned = self._expected.pop(0)
        if (name, tensor.dtype, tuple(tensor.shape)) != (planned.name, planned.dtype, planned.shape):
            raise ValueError(f"tensor {name!r} {tensor.dtype} {tuple(tensor.shape)} arrived where "
                             f"{planned.name!r} {planned.dtype} {planned.shape} was planned")
        self._stream.write(_raw_bytes(tensor))
        if not self._expected:
            self._close_stream()

    def _hold(self, name: str, tensor: torch.Tensor) -> None:
        planned = PlannedTensor(name, tensor.dtype, tuple(tensor.shape))
        if self._full(self._held_bytes, planned.nbytes):
            self._write_held()
        self._held.append((planned, tensor))
        self._held_bytes += planned.nbytes

    def _write_held(self) -> None:
        self._open([planned for planned, _ in self._held])
        for _, tensor in self._held:
            self._stream.write(_raw_bytes(tensor))
        self._expected = []
        self._close_stream()
        self._held, self._held_bytes = [], 0

    def _shard_file(self, shard: int) -> str:
        return os.path.join(self.out_dir, f"model-{shard + 1:05d}.safetensors.partial")

    def _open(self, shard: list[PlannedTensor]) -> None:
        header, offset = {}, 0
        for planned in shard:
            header[planned.name] = {"dtype": DTYPE_CODES[planned.dtype], "shape": list(planned.shape),
                                    "data_offsets": [offset, offset + planned.nbytes]}
            offset += planned.nbytes
            self.weight_map[planned.name] = self.shard_count
        self.total_bytes += offset
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._stream = open(self._shard_file(self.shard_count), "wb")
        self._stream.write(len(encoded).to_bytes(8, "little"))
        self._stream.write(encoded)
        self._expected = list(shard)
        self.shard_count += 1

    def _close_stream(self) -> None:
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None

    def close(self) -> list[str]:
        """Finish the last shard, name the shards and write the index (for several); returns the file names."""
        if self._planned is None:
            if self._held or not self.shard_count:
                self._write_held()
        else:
            missing = self._expected[:1] or next(self._planned, [])
            if missing:
                raise ValueError(f"tensor {missing[0].name!r} was planned but never written")
        count = self.shard_count
        files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for shard, file in enumerate(files):
            os.replace(self._shard_file(shard), os.path.join(self.out_dir, file))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: files[shard] for name, shard in self.weight_map.items()}}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        return files


def write_safetensors(
    items: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, max_shard_bytes: int | None = None
) -> list[str]:
    """Write a stream of tensors with `SafetensorsWriter` (unplanned); returns the file names."""
    writer = SafetensorsWriter(out_dir, max_shard_bytes)
    for name, tensor in items:
        writer.write(name, tensor)
    return writer.close()
