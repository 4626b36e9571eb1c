"""Tensors over a file's bytes in the page cache, for the conversion's big reads.

Reading a tensor into fresh memory costs a copy plus a page fault per 4 KB of that
memory (on a virtual machine the faults cost more than the copy). A private mapping,
populated in one call, gives the same bytes with neither: the tensor is the page cache,
copy-on-write should anything write to it.
"""

from __future__ import annotations

import mmap
import os
from typing import BinaryIO

import torch

MAP_MIN_BYTES = 1 << 20
"""Reads from this size up are mapped; smaller ones are cheaper to copy."""


class TruncatedFileError(ValueError):
    """The bytes asked for reach past the end of the file."""


def map_file_range(f: BinaryIO, offset: int, length: int, what: str) -> torch.Tensor:
    """`length` bytes of the open file `f` from `offset`, as a uint8 tensor over a private, populated mapping.

    A range reaching past the file's end is refused here (`what` names it in the error): touching a mapping
    there would kill the process with SIGBUS.
    """
    if os.fstat(f.fileno()).st_size < offset + length:
        raise TruncatedFileError(f"{what}: the file ends inside its data (truncated?)")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(f.fileno(), offset + length - start, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=offset - start)
