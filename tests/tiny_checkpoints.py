"""The tiny checkpoints the training and round-trip tests start from."""

from __future__ import annotations

import torch

from bridge import make_tiny_checkpoint
from bridge.convert import import_checkpoint


def imported_tiny(root, dtype: torch.dtype) -> str:
    """The tiny architecture (4 layers: sliding, CSA, HCA, CSA; 2 hash layers; 1 MTP layer), random
    (seed 0), as `python -m bridge import --dtype` writes it under `root/mcore`."""
    make_tiny_checkpoint(root / "hf", seed=0)
    import_checkpoint(root / "hf", root / "mcore", dtype=dtype, progress=False)
    return str(root / "mcore")
