"""Whole-checkpoint conversion: Hugging Face safetensors <-> Megatron-Core `torch_dist`, streaming.

    import_checkpoint(hf_dir, mcore_dir, dtype=torch.bfloat16)
    export_checkpoint(mcore_dir, hf_dir, dtype="source")     # or "bf16"
    verify(hf_dir, mcore_dir)                                # logits of both

Import reads each Hugging Face tensor once, dequantises FP8/FP4, fuses w1/w3 and
writes it straight into the Megatron-Core checkpoint (see `bridge.mcore_checkpoint`),
so memory holds a few tensors, never the model. Beside the Megatron-Core files it
writes `dsv4_bridge/`: the official-flavour `config.json` (enough to rebuild the
model), `source.json` (each official tensor's stored format) and the original
FP8/FP4 scales. Export reads the Megatron-Core tensors back in bounded groups and,
with `dtype="source"`, re-quantises each tensor to its source format, reusing the
original scale of every block the weights still fit exactly (bit-identical bytes
when the weights did not change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from bridge import pipeline
from bridge.auto_bridge import AutoBridge
from bridge.hf_config import read_hf_config, write_official_config
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE, TRANSLATORS
from bridge.hf_source import CheckpointError, HFSource, scale_name
from bridge.mcore_checkpoint import (
    CheckpointReader,
    build_meta_model,
    parameter_sharding,
    with_dtypes,
    write_checkpoint,
)
from bridge.mcore_naming import MCoreNaming, detect_expert_layout
from bridge.output_dir import atomic_output_dir
from bridge.progress import Progress
from bridge.quantisation import FP4, SourceFormat, dtype_name, requantise
from bridge.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from bridge.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter

RECORD_DIR = "dsv4_bridge"
RECORD_FILE = "source.json"
SCALES_DIR = "scales"
RECORD_FORMAT = "megatron_v4.bridge.source/1"
EXPORT_DTYPES = ("source", "bf16")
READ_GROUP_BYTES = 256 << 20
"""Export reads Megatron-Core tensors in groups of about this size (one DCP read per group)."""


# --- the record of the source checkpoint -----------------------------------------------------------
@dataclass
class SourceRecord:
    """What `import` keeps about the source checkpoint, in `<mcore dir>/dsv4_bridge/`."""

    naming: str
    config_flavour: str
    dtype: str
    """The `--dtype` of the import: the Megatron-Core model's params dtype."""
    mtp_num_layers: int
    expert_layout: str
    tensors: dict[str, SourceFormat] = field(default_factory=dict)

    def save(self, directory: str) -> None:
        data = dataclasses.asdict(self)
        data["tensors"] = {name: fmt.to_json() for name, fmt in self.tensors.items()}
        with open(os.path.join(directory, RECORD_FILE), "w") as f:
            json.dump({"format": RECORD_FORMAT, **data}, f, indent=1, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, mcore_dir: str) -> SourceRecord:
        path = os.path.join(mcore_dir, RECORD_DIR, RECORD_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{mcore_dir}: no {RECORD_DIR}/{RECORD_FILE}; export needs a checkpoint written by `python -m bridge "
                f"import` (or a copy of its {RECORD_DIR}/ folder beside the Megatron-Core files)"
            )
        with open(path) as f:
            data = json.load(f)
        if data.pop("format", None) != RECORD_FORMAT:
            raise CheckpointError(f"{path}: not a {RECORD_FORMAT} record")
        data["tensors"] = {name: SourceFormat.from_json(fmt) for name, fmt in data["tensors"].items()}
        return cls(**data)


class _ScaleShards:
    """Original FP8/FP4 scales, written to safetensors shards as they arrive (bounded memory)."""

    def __init__(self, directory: str, max_shard_bytes: int = 256 << 20):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files = 0

    def add(self, name: str, scale: torch.Tensor) -> None:
        self.shard[name] = scale.contiguous()
        self.shard_bytes += scale.numel() * scale.element_size()
        if self.shard_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.shard:
            return
        os.makedirs(self.directory, exist_ok=True)
        self.files += 1
        file = f"scales-{self.files:05d}.safetensors"
        save_file(self.shard, os.path.join(self.directory, file))
        self.weight_map.update(dict.fromkeys(self.shard, file))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if self.weight_map:
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump({"metadata": {}, "weight_map": self.weight_map}, f, indent=1, sort_keys=True)


# --- a world of one rank ----------------------------------------------------------------------------
@contextlib.contextmanager
def _single_rank():
    """Megatron-Core's parallel state for one rank: the caller's (if it is one rank) or a fresh one."""
    from megatron.core import parallel_state as ps

    import megatron_v4

    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"conversion runs on one rank; this process is set up with tp, pp, ep = {sizes}")
        yield
        return
    megatron_v4.initialize()
    try:
        yield
    finally:
        megatron_v4.destroy()


def _meta_layout(bridge: AutoBridge, dtype: torch.dtype):
    """(meta model's sharded state dict, its parameter sharding, Megatron-Core naming) at tp=pp=ep=1."""
    meta = build_meta_model(bridge.transformer_config(dtype=dtype))
    sharded = meta.sharded_state_dict()
    sharding = parameter_sharding(sharded)
    return sharded, sharding, MCoreNaming(detect_expert_layout(sharding))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- import -----------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    tensors: int
    source_bytes: int
    written_bytes: int
    seconds: float
    naming: str
    quantised: dict[str, int]


def import_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Hugging Face checkpoint (any naming, config flavour, FP8/FP4 or not) -> Megatron-Core `torch_dist`."""
    source = HFSource(hf_dir)
    bridge = AutoBridge(source.config, source, OFFICIAL)
    with _single_rank():
        sharded, sharding, mcore = _meta_layout(bridge, dtype)
        plan = _import_plan(source, sharding, mcore)
        sharded = with_dtypes(sharded, {name: dtype for name, (_, dtype) in plan.items()})
        sharding = parameter_sharding(sharded)
        order = sorted(plan, key=lambda name: _reading_position(source, plan[name][0]))
        total = sum(source.stored_bytes(o) for sources, _ in plan.values() for o in sources)
        bar = Progress("import", len(source.names()), total, enabled=progress)
        with atomic_output_dir(out_dir, force) as tmp:
            record_dir = os.path.join(tmp, RECORD_DIR)
            os.makedirs(record_dir)
            scales = _ScaleShards(os.path.join(record_dir, SCALES_DIR))

            def materialise(name: str) -> torch.Tensor:
                sources, stored_dtype = plan[name]
                pieces = []
                for official in sources:
                    wanted = stored_dtype if stored_dtype.is_floating_point else torch.float32
                    values, scale = source.read(official, wanted)
                    if scale is not None:
                        scales.add(scale_name(official), scale)
                    pieces.append(_cast(official, values, stored_dtype))
                    bar.update(source.stored_bytes(official))
                full = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
                return full.reshape(sharding[name].data.shape)

            written = Progress("written", len(plan), 0, enabled=False)
            write_checkpoint(tmp, sharded, materialise, order=order,
                             on_written=lambda name, tensor: written.update(tensor.nbytes))
            scales.close()
            write_official_config(source.config, record_dir)
            record = SourceRecord(
                naming=source.naming,
                config_flavour=source.config.flavour,
                dtype=dtype_name(dtype),
                mtp_num_layers=bridge.mtp_num_layers,
                expert_layout=mcore.expert_layout,
                tensors={name: source.tensors[name].format for name in source.names()},
            )
            record.save(record_dir)
        bar.close()
    quantised: dict[str, int] = {}
    for name in source.names():
        kind = source.tensors[name].format.quant or source.tensors[name].format.dtype
        quantised[kind] = quantised.get(kind, 0) + 1
    return ImportReport(len(source.names()), total, written.bytes, bar.seconds, source.naming, quantised)


def _import_plan(source: HFSource, sharding: dict, mcore: MCoreNaming) -> dict[str, tuple[list[str], torch.dtype]]:
    """Model parameter -> (its official source tensors, the dtype to store it in); checks names and shapes."""
    plan = {}
    needed = set()
    for name, sharded in sharding.items():
        official = mcore.from_mcore(name).official_names
        needed.update(official)
        missing = [o for o in official if o not in source.tensors]
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]!r} is missing from the checkpoint (a model of this config.json needs it)"
            )
        shape = tuple(sharded.data.shape)
        rows = shape[0] // len(official) if shape else 0
        for o in official:
            expected = (rows, *shape[1:]) if len(official) > 1 else shape
            got = source.tensors[o].shape
            if _numel(got) != _numel(expected) or (len(got) == len(expected) and tuple(got) != tuple(expected)):
                raise CheckpointError(
                    f"tensor {o!r} has shape {tuple(got)} but config.json implies {tuple(expected)}; "
                    "the config does not match the tensors"
                )
        plan[name] = (official, _stored_dtype(source, official, sharded.data.dtype))
    extra = [o for o in source.names() if o not in needed]
    if extra:
        raise CheckpointError(
            f"tensor {extra[0]!r} is in the checkpoint but not in a model of its config.json "
            f"({len(extra)} such tensors); the config does not match the tensors"
        )
    return plan


def _stored_dtype(source: HFSource, official: list[str], model_dtype: torch.dtype) -> torch.dtype:
    """The model's dtype, but never below the source's precision (fp32 tensors stay fp32)."""
    formats = [source.tensors[o].format for o in official]
    for o, fmt in zip(official, formats):
        if fmt.quant is None and model_dtype.is_floating_point != fmt.torch_dtype.is_floating_point:
            kind = "a floating-point" if model_dtype.is_floating_point else "an integer"
            raise CheckpointError(f"tensor {o!r} is {fmt.dtype}; the model expects {kind} tensor")
    if model_dtype.is_floating_point and any(
        fmt.quant is None and fmt.torch_dtype.itemsize > model_dtype.itemsize for fmt in formats
    ):
        return torch.float32
    return model_dtype


def _cast(name: str, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not dtype.is_floating_point:
        cast = values.to(dtype)
        if not torch.equal(cast.to(values.dtype), values):
            raise CheckpointError(f"tensor {name!r}: values do not fit {dtype_name(dtype)}")
        return cast
    return values.to(dtype)


def _reading_position(source: HFSource, official: list[str]) -> tuple:
    """Sort key reading the source files in order (one file after the other)."""
    return (source.file_of(official[0]), official[0])


# --- export -----------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    tensors: int
    written_bytes: int
    seconds: float
    fresh_scale_blocks: int = 0
    quantised_tensors: int = 0
    files: list[str] = field(default_factory=list)


def export_checkpoint(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "source",
    force: bool = False,
    max_shard_bytes: int = 1 << 30,
    progress: bool = True,
) -> ExportReport:
    """Megatron-Core checkpoint written by `import_checkpoint` (maybe trained since) -> official safetensors.

    `dtype="source"` re-quantises each tensor to the format it had in the source checkpoint;
    `"bf16"` writes the FP8/FP4 and bf16 tensors as bf16 (fp32 and integer ones keep their dtype).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use one of {EXPORT_DTYPES}")
    mcore_dir = os.fspath(mcore_dir)
    record = SourceRecord.load(mcore_dir)
    config = read_hf_config(os.path.join(mcore_dir, RECORD_DIR))
    scales_dir = os.path.join(mcore_dir, RECORD_DIR, SCALES_DIR)
    originals = SafetensorsCheckpoint(scales_dir) if os.path.isdir(scales_dir) else None
    weights = _NamesOnly(["mtp.0."] if record.mtp_num_layers else [])
    bridge = AutoBridge(config, weights, record.naming)
    report = ExportReport(len(record.tensors), 0, 0.0)
    with _single_rank():
        sharded, sharding, mcore = _meta_layout(bridge, getattr(torch, record.dtype))
        reader = CheckpointReader(mcore_dir, sharded)
        total = sum(_numel(s.data.shape) * reader.stored_dtype(n).itemsize for n, s in sharding.items())
        bar = Progress("export", len(sharding), total, enabled=progress)

        def official_tensors():
            for name, tensor in reader.read(sharding, max_group_bytes=READ_GROUP_BYTES):
                bar.update(tensor.nbytes)
                for official, piece in pipeline.split([(name, tensor)], mcore):
                    yield from _exported(official, piece, record, dtype, originals, report)

        with atomic_output_dir(out_dir, force) as tmp:
            writer = StreamingSafetensorsWriter(tmp, _export_plan(sharding, mcore, record, dtype), max_shard_bytes)
            for name, tensor in official_tensors():
                writer.write(name, tensor)
            report.files = writer.close()
            written_config = config
            if dtype == "bf16":
                written_config = dataclasses.replace(config, quantization_config=None, expert_dtype=None,
                                                     dtype="bfloat16")
            write_official_config(written_config, tmp)
            report.written_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in report.files)
        bar.close()
    report.seconds = bar.seconds
    return report


def _export_plan(sharding: dict, mcore: MCoreNaming, record: SourceRecord, dtype: str) -> list[PlannedTensor]:
    """Every tensor the export writes, in order, with its dtype and shape (see `_exported`)."""
    plan = []
    for name, sharded in sharding.items():
        official = mcore.from_mcore(name).official_names
        shape = tuple(sharded.data.shape)
        piece = (shape[0] // len(official), *shape[1:]) if len(official) > 1 else shape
        for o in official:
            fmt = record.tensors.get(o)
            if fmt is None:
                raise CheckpointError(f"tensor {o!r} has no entry in the import record {RECORD_DIR}/{RECORD_FILE}")
            if fmt.quant is None:
                keep = not (dtype == "bf16" and fmt.dtype == "bfloat16")
                plan.append(PlannedTensor(o, fmt.torch_dtype if keep else torch.bfloat16, piece))
            elif dtype == "bf16":
                plan.append(PlannedTensor(o, torch.bfloat16, piece))
            else:
                rows, cols = piece
                if fmt.quant == FP4:
                    plan.append(PlannedTensor(o, fmt.torch_dtype, (rows, cols // 2)))
                else:
                    plan.append(PlannedTensor(o, fmt.torch_dtype, piece))
                blocks = (-(-rows // fmt.block[0]), -(-cols // fmt.block[1]))
                plan.append(PlannedTensor(scale_name(o), getattr(torch, fmt.scale_dtype), blocks))
    return plan


class _NamesOnly:
    def __init__(self, names):
        self._names = names

    def names(self):
        return self._names


def _exported(official, tensor, record: SourceRecord, dtype: str, originals, report: ExportReport):
    fmt = record.tensors.get(official)
    if fmt is None:
        raise CheckpointError(f"tensor {official!r} has no entry in the import record {RECORD_DIR}/{RECORD_FILE}")
    tensor = tensor.contiguous()
    if fmt.quant is None:
        if dtype == "bf16" and fmt.dtype == "bfloat16":
            yield official, tensor.to(torch.bfloat16)
        else:
            yield official, tensor.to(fmt.torch_dtype)
        return
    if dtype == "bf16":
        yield official, tensor.to(torch.bfloat16)
        return
    original = originals.get(scale_name(official)) if originals is not None else None
    stored, scale, fresh = requantise(tensor, fmt, original)
    report.quantised_tensors += 1
    report.fresh_scale_blocks += fresh
    yield official, stored.view(fmt.torch_dtype)
    yield scale_name(official), scale


# --- verify -----------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    max_abs_diff: float
    max_abs_logit: float
    min_cosine: float
    argmax_agreement: float
    sequences: int
    seq_len: int

    def passed(self, min_cosine: float = 0.999, min_argmax: float = 0.99) -> bool:
        return self.min_cosine >= min_cosine and self.argmax_agreement >= min_argmax


def hf_reference_model(hf_dir: str | os.PathLike):
    """transformers' `DeepseekV4ForCausalLM` (fp32) with the checkpoint's weights, dequantised.

    Holds the whole model: for checking small checkpoints, not for the released ones.
    """
    from transformers import DeepseekV4ForCausalLM

    from bridge.hf_config import transformers_config

    source = HFSource(hf_dir)
    model = DeepseekV4ForCausalLM(transformers_config(source.config)).eval()
    official = ((name, _as_fp32(source.read(name)[0])) for name in source.names() if not name.startswith("mtp."))
    module_state = dict(TRANSLATORS[TRANSFORMERS_MODULE].from_official(
        official, num_experts=source.config.num_routed_experts))
    model.load_state_dict(module_state, strict=True)
    return model


def _as_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def load_megatron_model(mcore_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, **config_overrides):
    """`DeepSeekV4Model` (this rank's pipeline stage and shards) loaded from a checkpoint written by import.

    Extra keyword arguments go to the `DeepSeekV4TransformerConfig`.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_v4.model import DeepSeekV4Model

    mcore_dir = os.fspath(mcore_dir)
    record = SourceRecord.load(mcore_dir)
    config = read_hf_config(os.path.join(mcore_dir, RECORD_DIR))
    bridge = AutoBridge(config, _NamesOnly(["mtp.0."] if record.mtp_num_layers else []), record.naming)
    model = DeepSeekV4Model(
        bridge.transformer_config(dtype=dtype, **config_overrides),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    ).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), mcore_dir))
    return model


def verify(hf_dir, mcore_dir, sequences: int = 3, seq_len: int = 48, seed: int = 0) -> VerifyReport:
    """Logits of transformers on the Hugging Face checkpoint and of Megatron-Core on the imported one."""
    reference = hf_reference_model(hf_dir)
    vocab = reference.config.vocab_size
    input_ids = torch.randint(0, vocab, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits.float()
    with _single_rank():
        model = load_megatron_model(mcore_dir)
        with torch.no_grad():
            got = model(input_ids).float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(0, 1), expected.flatten(0, 1), dim=-1)
    return VerifyReport(
        max_abs_diff=(got - expected).abs().max().item(),
        max_abs_logit=expected.abs().max().item(),
        min_cosine=cosine.min().item(),
        argmax_agreement=(got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        sequences=sequences,
        seq_len=seq_len,
    )
