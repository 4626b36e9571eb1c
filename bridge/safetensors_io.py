"""The bridge's one safetensors reader and one safetensors writer.

A checkpoint is a single `model.safetensors`, or shards listed by
`model.safetensors.index.json` (the files `transformers`' `save_pretrained` writes).
A safetensors file is an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the bytes
(https://github.com/huggingface/safetensors#format).

Reading parses the headers once and then reads each tensor, or the rows of it that
a caller needs, with plain file reads: a memory map would keep every byte read
resident in the process until the file is closed.

Writing streams: each shard's header is written first and each tensor's bytes go to
disk as they come, so memory holds one tensor. When the caller announces every
tensor beforehand (`planned`), shards are laid out from the announcement and each
tensor is written at its place, in any order and from any thread; otherwise tensors
are held until a shard is full.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from bridge.file_mapping import MAP_MIN_BYTES, TruncatedFileError, map_file_range

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
        with open(header.file, "rb", buffering=0) as f:
            if len(runs) == 1 and run_bytes >= MAP_MIN_BYTES:
                try:
                    data = map_file_range(f, runs[0], run_bytes, f"tensor {name!r} in {header.file}")
                except TruncatedFileError as e:
                    raise SafetensorsError(str(e)) from None
                return data.view(header.dtype).reshape(out_shape)
            buffer = torch.empty(run_bytes * len(runs), dtype=torch.uint8)
            view = memoryview(buffer.numpy())
            for i, offset in enumerate(runs):
                if os.preadv(f.fileno(), [view[i * run_bytes:(i + 1) * run_bytes]], offset) != run_bytes:
                    raise SafetensorsError(
                        f"tensor {name!r} in {header.file}: the file ends inside its data (truncated?)")
        return buffer.view(header.dtype).reshape(out_shape)

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

    With `planned` (every tensor's name, dtype and shape, in the order the shards hold
    them) each tensor goes to disk at its planned place as it is written, in any order
    and from several threads at once; without, tensors are held until their shard is
    full. `close()` returns the file names.
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
        self._held: list[tuple[PlannedTensor, torch.Tensor]] = []
        self._held_bytes = 0
        self._lock = threading.Lock()
        self._places: dict[str, tuple[PlannedTensor, int, int]] = {}
        """Planned tensor name -> (its announcement, its shard, its data's offset in the shard file)."""
        self._shards: list[list[PlannedTensor]] = []
        self._open_files: dict[int, int] = {}
        self._unwritten: list[int] = []
        """Per planned shard, how many of its tensors are not written yet."""
        if planned is not None:
            for shard in self._shards_of(list(planned)):
                self._plan_shard(shard)

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

    def _plan_shard(self, shard: list[PlannedTensor]) -> None:
        data_start = len(self._header(shard))
        offset = 0
        for planned in shard:
            self._places[planned.name] = (planned, len(self._shards), data_start + offset)
            offset += planned.nbytes
        self._shards.append(shard)
        self._unwritten.append(len(shard))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with self._lock:
            if name in self._seen:
                raise ValueError(f"tensor {name!r} written twice")
            self._seen.add(name)
            if not self._shards:
                self._hold(name, tensor)
                return
            place = self._places.get(name)
            if place is None:
                raise ValueError(f"tensor {name!r} was not planned (every planned tensor is written)")
            planned, shard, offset = place
            if (tensor.dtype, tuple(tensor.shape)) != (planned.dtype, planned.shape):
                raise ValueError(f"tensor {name!r} arrived as {tensor.dtype} {tuple(tensor.shape)}; "
                                 f"{planned.dtype} {planned.shape} was planned")
            if shard not in self._open_files:
                self._open_files[shard] = self._create(self._shards[shard], shard)
            fd = self._open_files[shard]
        data = _raw_bytes(tensor)
        written = 0
        while written < len(data):  # outside the lock: other threads write to their places meanwhile
            written += os.pwrite(fd, data[written:], offset + written)
        with self._lock:
            self._unwritten[shard] -= 1
            if not self._unwritten[shard]:
                self._close_file(self._open_files.pop(shard))

    def _hold(self, name: str, tensor: torch.Tensor) -> None:
        planned = PlannedTensor(name, tensor.dtype, tuple(tensor.shape))
        if self._full(self._held_bytes, planned.nbytes):
            self._write_held()
        self._held.append((planned, tensor))
        self._held_bytes += planned.nbytes

    def _write_held(self) -> None:
        fd = self._create([planned for planned, _ in self._held], self.shard_count)
        for _, tensor in self._held:
            os.write(fd, _raw_bytes(tensor))
        self._close_file(fd)
        self._held, self._held_bytes = [], 0

    def _shard_file(self, shard: int) -> str:
        return os.path.join(self.out_dir, f"model-{shard + 1:05d}.safetensors.partial")

    @staticmethod
    def _header(shard: list[PlannedTensor]) -> bytes:
        """A shard's header: its length (8 bytes, little-endian), then JSON padded so the data starts 8-byte
        aligned."""
        header, offset = {}, 0
        for planned in shard:
            header[planned.name] = {"dtype": DTYPE_CODES[planned.dtype], "shape": list(planned.shape),
                                    "data_offsets": [offset, offset + planned.nbytes]}
            offset += planned.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        return len(encoded).to_bytes(8, "little") + encoded

    def _create(self, shard: list[PlannedTensor], number: int) -> int:
        """Shard `number`'s file, its header written; returns its descriptor, positioned after the header."""
        for planned in shard:
            self.weight_map[planned.name] = number
        self.total_bytes += sum(planned.nbytes for planned in shard)
        self.shard_count = max(self.shard_count, number + 1)
        fd = os.open(self._shard_file(number), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(fd, self._header(shard))
        return fd

    @staticmethod
    def _close_file(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> list[str]:
        """Finish the last shard, name the shards and write the index (for several); returns the file names."""
        if not self._shards:
            if self._held or not self.shard_count:
                self._write_held()
        else:
            missing = [name for name in self._places if name not in self._seen]
            if missing:
                raise ValueError(f"tensor {missing[0]!r} was planned but never written")
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
