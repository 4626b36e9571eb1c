"""Cut a smaller DeepSeek-V4 checkpoint out of a bigger one (`python -m bridge slice`), with provenance.

The source is any checkpoint `HFSource` reads (three namings, FP8/FP4 dequantised). The output is an
official-naming checkpoint of the small config, `provenance.json` (each tensor COPY / SLICE / INIT, its
source tensor and the kept source indices of each dim) and `frozen_keys.json` (the COPY tensors, for
`pretrain.py --freeze-file`). One tensor is read, cut and written at a time (memory: one tensor and at
most one output shard); only the kept experts are read; the output directory appears complete or not
at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch

from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config, write_official_config
from bridge.hf_source import MTP_PREFIX, HFSource
from bridge.output_dir import atomic_output_dir
from bridge.progress import Progress
from bridge.quantisation import (
    FP4,
    FP4_GROUP,
    release_plain_format,
    requantise,
    scale_name,
)
from bridge.safetensors_io import SafetensorsWriter
from bridge.slice_command import FIRST, GATE_NORM, SLICE_DTYPES
from bridge.slicing import (
    BLOCK_RULES,
    COPY,
    HASH_ONLY,
    INIT,
    INIT_RULES,
    LEARNED_ONLY,
    MTP_RULES,
    SLICE,
    TOP_RULES,
    BlockContext,
    SliceError,
    TensorRule,
    check_experts,
    check_sliceable,
    choose_layers,
    experts_by_gate_norm,
    first,
    random_hash_table,
    read_expert_file,
    tensor_rule,
)

PROVENANCE_FILE = "provenance.json"
FROZEN_KEYS_FILE = "frozen_keys.json"
PROVENANCE_FORMAT = "megatron_v4.bridge.slice/1"
BLOCK_NAME = re.compile(r"^((?:layers|mtp)\.\d+\.)(.*)$")


@dataclass(frozen=True)
class Block:
    """A source block (layer or MTP layer) the slice keeps, and what it becomes."""

    source_prefix: str
    prefix: str
    rules: dict
    context: BlockContext
    hash_routed: bool
    """Whether the slice's block is hash-routed (it has tid2eid, no gate.bias)."""


@dataclass
class SliceReport:
    counts: dict[str, int]
    layers: list[int]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _choose_experts(source: HFSource, dst: DeepSeekV4HFConfig, source_prefix: str, experts: str) -> torch.Tensor:
    src = source.config
    if experts == FIRST:
        return first(dst.num_routed_experts)
    if experts == GATE_NORM:
        gate = source.read_share(source_prefix + "ffn.gate.weight")
        return experts_by_gate_norm(gate, dst.num_routed_experts)
    chosen = read_expert_file(experts)
    block = source_prefix.rstrip(".")
    ids = chosen.get(block) if isinstance(chosen, dict) else chosen
    return check_experts(ids, block, src.num_routed_experts, dst.num_routed_experts)


def plan_blocks(source: HFSource, dst: DeepSeekV4HFConfig, layers: list[int], experts: str) -> list[Block]:
    """The kept layers (then MTP layers, if the source has them), each with its expert choice."""
    src = source.config
    blocks = []
    for i, n in enumerate(layers):
        experts_kept = _choose_experts(source, dst, f"layers.{n}.", experts)
        context = BlockContext(src, dst, src.compress_ratios[n], experts_kept)
        blocks.append(Block(f"layers.{n}.", f"layers.{i}.", BLOCK_RULES, context, i < dst.num_hash_layers))
    has_mtp = any(name.startswith(MTP_PREFIX) for name in source.names())
    for k in range(dst.num_nextn_predict_layers if has_mtp else 0):
        experts_kept = _choose_experts(source, dst, f"mtp.{k}.", experts)
        blocks.append(Block(f"mtp.{k}.", f"mtp.{k}.", MTP_RULES, BlockContext(src, dst, 0, experts_kept), False))
    return blocks


def plan_tensors(source: HFSource, dst: DeepSeekV4HFConfig, blocks: list[Block]) -> list[TensorRule]:
    """Every slice tensor's rule, in the source's reading order, then the INIT ones."""
    by_prefix = {b.source_prefix: b for b in blocks}
    top = BlockContext(source.config, dst, 0, None)
    planned = []
    for name in sorted(source.names(), key=lambda n: _reading_position(source, n)):
        shape = source.tensors[name].shape
        match = BLOCK_NAME.match(name)
        if match is None:
            planned.append(tensor_rule(name, name, name, shape, TOP_RULES, top))
            continue
        block = by_prefix.get(match.group(1))
        suffix = match.group(2)
        if block is None or suffix == (LEARNED_ONLY if block.hash_routed else HASH_ONLY):
            continue
        if suffix.startswith("ffn.experts."):
            source_expert = int(suffix.split(".")[2])
            new = (block.context.experts == source_expert).nonzero()
            if len(new) == 0:
                continue
            suffix = suffix.replace(f"ffn.experts.{source_expert}.", f"ffn.experts.{int(new)}.", 1)
        planned.append(tensor_rule(block.prefix + suffix, name, match.group(2), shape, block.rules, block.context))
    present = {rule.name for rule in planned}
    for block in blocks:
        needed = block.prefix + (HASH_ONLY if block.hash_routed else LEARNED_ONLY)
        if needed not in present:
            planned.append(TensorRule(needed, INIT, None, init=INIT_RULES[needed.removeprefix(block.prefix)]))
    return planned


def _reading_position(source: HFSource, name: str) -> tuple:
    header = source.checkpoint.headers[source.tensors[name].name]
    return header.file, header.begin


def _init_values(rule: TensorRule, dst: DeepSeekV4HFConfig, seed: int) -> torch.Tensor:
    if rule.name.endswith(HASH_ONLY):
        layer = int(rule.name.split(".")[1])
        return random_hash_table(dst.vocab_size, dst.num_routed_experts, dst.num_experts_per_tok, seed + layer,
                                 torch.int64)
    return torch.zeros(dst.num_routed_experts, dtype=torch.float32)


def _made(source: HFSource, rule: TensorRule, dst: DeepSeekV4HFConfig, dtype: str, seed: int):
    """(name, tensor) pairs the output holds for one rule: the weight, and its scale when quantised."""
    if rule.kind == INIT:
        yield rule.name, _init_values(rule, dst, seed)
        return
    stored = source.tensors[rule.source]
    quantised = stored.scale is not None
    if rule.kind == COPY and dtype == "source" and quantised:
        yield rule.name, source.checkpoint.get(stored.name)
        yield scale_name(rule.name), source.checkpoint.get(stored.scale)
        return
    values = source.read(rule.source)[0] if quantised else source.read_share(rule.source)
    values = rule.apply(values, dst.num_experts_per_tok)
    if dtype == "bf16":
        yield rule.name, values.to(release_plain_format(rule.name, values.dtype).torch_dtype)
    elif quantised:
        if stored.format.quant == FP4 and values.shape[-1] % FP4_GROUP:
            raise SliceError(f"{rule.name}: {values.shape[-1]} inputs cannot be stored as FP4 (groups of "
                             f"{FP4_GROUP}); use --dtype bf16 or a config whose cut keeps a multiple of {FP4_GROUP}")
        weight, scale, _ = requantise(values, stored.format)
        yield rule.name, weight.view(stored.format.torch_dtype)
        yield scale_name(rule.name), scale
    else:
        yield rule.name, values


def _written_config(src: DeepSeekV4HFConfig, dst: DeepSeekV4HFConfig, dtype: str) -> DeepSeekV4HFConfig:
    if dtype == "bf16":
        return dataclasses.replace(dst, dtype="bfloat16", quantization_config=None, expert_dtype=None)
    return dataclasses.replace(dst, dtype=src.dtype, quantization_config=src.quantization_config,
                               expert_dtype=src.expert_dtype)


def slice_checkpoint(
    hf_dir: str | os.PathLike,
    config: str | os.PathLike | DeepSeekV4HFConfig,
    out_dir: str | os.PathLike,
    layers: list[int] | None = None,
    experts: str = GATE_NORM,
    seed: int = 0,
    dtype: str = "bf16",
    force: bool = False,
    max_shard_bytes: int = 1 << 30,
    progress: bool = True,
) -> SliceReport:
    """Write the slice of `hf_dir` to the small `config` (a config.json path or a config) into `out_dir`.

    `layers`: the source layer of each slice layer (default: even stride); `experts`: `gate-norm`,
    `first` or a JSON file (see `read_expert_file`); `dtype`: `bf16` (fp32 where the releases keep
    fp32) or `source` (each tensor in its source format; cut FP8/FP4 tensors get fresh scales).
    """
    if dtype not in SLICE_DTYPES:
        raise SliceError(f"slice dtype {dtype!r}: use one of {SLICE_DTYPES}")
    source = HFSource(hf_dir)
    dst = config if isinstance(config, DeepSeekV4HFConfig) else read_hf_config(config)
    check_sliceable(source.config, dst)
    kept_layers = choose_layers(source.config, dst, layers)
    blocks = plan_blocks(source, dst, kept_layers, experts)
    planned = plan_tensors(source, dst, blocks)
    report = SliceReport({kind: sum(r.kind == kind for r in planned) for kind in (COPY, SLICE, INIT)}, kept_layers)
    total = sum(source.stored_bytes(r.source) for r in planned if r.source)
    bar = Progress("slice", len(planned), total, enabled=progress)
    with atomic_output_dir(out_dir, force) as tmp:
        writer = SafetensorsWriter(tmp, max_shard_bytes)
        for rule in planned:
            for name, tensor in _made(source, rule, dst, dtype, seed):
                writer.write(name, tensor)
            bar.update(source.stored_bytes(rule.source) if rule.source else 0)
        report.files = writer.close()
        write_official_config(_written_config(source.config, dst, dtype), tmp)
        provenance = {
            "format": PROVENANCE_FORMAT,
            "source": os.path.abspath(os.fspath(hf_dir)),
            "source_naming": source.naming,
            "dtype": dtype,
            "seed": seed,
            "experts_rule": experts,
            "blocks": {b.prefix.rstrip("."): {"source": b.source_prefix.rstrip("."),
                                              "experts": b.context.experts.tolist()} for b in blocks},
            "counts": report.counts,
            "tensors": {r.name: r.provenance() for r in sorted(planned, key=lambda r: r.name)},
        }
        _write_json(os.path.join(tmp, PROVENANCE_FILE), provenance)
        _write_json(os.path.join(tmp, FROZEN_KEYS_FILE), sorted(r.name for r in planned if r.kind == COPY))
    bar.close()
    report.seconds = bar.seconds
    return report


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")

