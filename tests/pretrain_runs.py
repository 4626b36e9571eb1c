"""Runs of `examples/pretrain.py` on gloo ranks, and the tiny checkpoints they start from (shared by the
training, training-recipe and round-trip tests)."""

from __future__ import annotations

import os
import sys

import torch

from bridge import make_tiny_checkpoint
from bridge.convert import import_checkpoint
from megatron_v4.runtime.ranks import run_on_ranks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import pretrain  # noqa: E402

LOGGED = ("step", "loss", "mtp_loss", "grad_norm", "lr", "tokens")
"""The per-step metrics every rank must agree on."""


def imported_tiny(root, dtype: torch.dtype) -> str:
    """The tiny architecture (4 layers: sliding, CSA, HCA, CSA; 2 hash layers; 1 MTP layer), random
    (seed 0), as `python -m bridge import --dtype` writes it under `root/mcore`."""
    make_tiny_checkpoint(root / "hf", seed=0)
    import_checkpoint(root / "hf", root / "mcore", dtype=dtype, progress=False)
    return str(root / "mcore")


def train(argv: list[str]) -> list[dict]:
    """Rank entry point: the script's own main()."""
    return pretrain.main(argv)


def launch(world: int, argv: list[str]) -> list[dict]:
    """`pretrain.py argv` on `world` ranks: the logged metrics (and validation results, where the run has
    them), checked equal on every rank."""
    results = run_on_ranks(train, world, argv, timeout=300)
    logged = [[{k: m[k] for k in LOGGED} | ({"eval": m["eval"]} if "eval" in m else {}) for m in history]
              for history in results]
    assert all(r == logged[0] for r in logged), "ranks disagree on the logged metrics"
    return logged[0]
