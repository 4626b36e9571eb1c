"""Reading and writing safetensors checkpoints one tensor at a time.

A checkpoint is a single `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Reading is lazy (`safe_open`), so a caller can
stream a checkpoint larger than memory; writing fills shards up to a byte
budget and writes the index at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint directory (or single file), opened lazily."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.directory = path if os.path.isdir(path) else os.path.dirname(path)
        self._file_of: dict[str, str] = {}
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_FILE)
            single = os.path.join(path, SINGLE_FILE)
            if os.path.isfile(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                self._file_of = {name: os.path.join(path, file) for name, file in weight_map.items()}
            elif os.path.isfile(single):
                self._file_of = dict.fromkeys(_names_in(single), single)
            else:
                raise FileNotFoundError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        elif path.endswith(".safetensors"):
            self._file_of = dict.fromkeys(_names_in(path), path)
        else:
            raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a .safetensors file")

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> str:
        """The file that holds tensor `name`."""
        return self._file_of[name]

    def files(self) -> list[str]:
        return sorted(set(self._file_of.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, file by file, each read only when the iteration reaches it."""
        by_file: dict[str, list[str]] = {}
        for name, file in self._file_of.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)


def _names_in(file: str) -> list[str]:
    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with storage of its own (safetensors refuses views that share storage)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def write_safetensors(
    items: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write a stream of tensors as `model.safetensors`, or as shards plus an index past `max_shard_bytes`.

    Returns the written file names. Tensors are held in memory one shard at a time.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shard_names: list[str] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    total_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        temporary = f"model-{len(shard_names) + 1:05d}.safetensors.partial"
        save_file(shard, os.path.join(out_dir, temporary), metadata={"format": "pt"})
        shard_names.append(temporary)
        shard, shard_bytes = {}, 0

    for name, tensor in items:
        if name in weight_map or name in shard:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = _owned(tensor)
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
        weight_map[name] = len(shard_names)
    if shard or not shard_names:
        flush()

    if len(shard_names) == 1:
        os.replace(os.path.join(out_dir, shard_names[0]), os.path.join(out_dir, SINGLE_FILE))
        return [SINGLE_FILE]
    final = [f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors" for i in range(len(shard_names))]
    for temporary, name in zip(shard_names, final):
        os.replace(os.path.join(out_dir, temporary), os.path.join(out_dir, name))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {n: final[i] for n, i in weight_map.items()}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return final
