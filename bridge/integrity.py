"""Checksums that let export and verify notice a damaged or incomplete import, and the finiteness check.

`import` writes `dsv4_bridge/checksums.json`: the SHA-256 of every stored tensor's bytes (as
written, in its stored dtype) and of every file of the record (`config.json`, `source.json`, the
original scales). A training save's record lists its record files only: its weights have changed.
Export and verify check every file of the manifest (a deleted `scales/` folder is named) and
every tensor they read (a flipped bit in a `.distcp` file is named).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from bridge.checkpoint_dirs import RECORD_DIR

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "megatron_v4.bridge.checksums/1"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its dtype and C order."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(record_dir: str, tensors: dict[str, str] | None = None) -> None:
    """`record_dir/checksums.json` over the files now in `record_dir`, and the tensors' digests if given."""
    files = {}
    for directory, _, names in os.walk(record_dir):
        for name in names:
            path = os.path.join(directory, name)
            if name != CHECKSUMS_FILE:
                files[os.path.relpath(path, record_dir)] = file_digest(path)
    with open(os.path.join(record_dir, CHECKSUMS_FILE), "w") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "files": files, "tensors": tensors or {}}, f, indent=1, sort_keys=True)
        f.write("\n")


class Checksums:
    """The manifest of a Megatron-Core checkpoint directory, its record files checked on opening."""

    def __init__(self, mcore_dir: str):
        record_dir = os.path.join(mcore_dir, RECORD_DIR)
        path = os.path.join(record_dir, CHECKSUMS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing, so the checkpoint cannot be checked; re-run `python -m bridge "
                             "import` (or, for a training save, save it again)")
        try:
            with open(path) as f:
                data = json.load(f)
            files, self.tensors, kind = dict(data["files"]), dict(data["tensors"]), data["format"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: damaged ({e}); re-run `python -m bridge import`") from None
        if kind != CHECKSUMS_FORMAT:
            raise ValueError(f"{path}: not a {CHECKSUMS_FORMAT} manifest; re-run `python -m bridge import`")
        for name, digest in sorted(files.items()):
            file = os.path.join(record_dir, name)
            if not os.path.isfile(file):
                raise ValueError(f"{file}: missing from the record; restore it or re-run `python -m bridge import`")
            if file_digest(file) != digest:
                raise ValueError(f"{file}: its checksum differs from {CHECKSUMS_FILE}'s; the file is damaged")

    def check_tensor(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.tensors.get(name)
        if expected is not None and tensor_digest(tensor) != expected:
            raise ValueError(f"tensor {name!r}: its bytes differ from those import wrote (checksum in "
                             f"{RECORD_DIR}/{CHECKSUMS_FILE}); the Megatron-Core checkpoint is damaged")


def refuse_nonfinite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Raise if a floating-point tensor holds NaN or Inf (`--allow-nonfinite` skips this check)."""
    if tensor.is_floating_point() and not _all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name!r} in {where} holds {bad} NaN/Inf value(s); fix the weights or pass "
                         "--allow-nonfinite to convert them anyway")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass: min and max propagate NaN and are infinite if any value is
    (about 10x faster than `isfinite(...).all()`, which writes a mask, on CPU bf16)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
