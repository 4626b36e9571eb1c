"""Where a run's metrics go besides the log line: a JSON-lines file (one object per training step, one per
evaluation) and TensorBoard scalars. Rank 0 writes; the metrics are identical on every rank."""

from __future__ import annotations

import json
import math
import os

import torch.distributed as dist

STEP_FIELDS = ("step", "loss", "mtp_loss", "indexer_loss", "grad_norm", "lr", "tokens_per_s", "mem_gb")
EVAL_FIELDS = ("step", "eval_loss", "eval_mtp_loss", "eval_indexer_loss")


def _number(value):
    """JSON has no NaN: a quantity that does not apply (or is not a number) is null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


class MetricsWriter:
    def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None):
        self._jsonl = None
        self._tensorboard = None
        if dist.get_rank() != 0:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=tensorboard_dir)

    def _write(self, kind: str, metrics: dict, fields: tuple[str, ...]) -> None:
        record = {"kind": kind, **{key: _number(metrics.get(key)) for key in fields}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and value is not None:
                    tag = f"eval/{key.removeprefix('eval_')}" if kind == "eval" else f"train/{key}"
                    self._tensorboard.add_scalar(tag, value, record["step"])
            self._tensorboard.flush()

    def step(self, metrics: dict) -> None:
        self._write("train", metrics, STEP_FIELDS)

    def evaluation(self, metrics: dict) -> None:
        self._write("eval", metrics, EVAL_FIELDS)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
