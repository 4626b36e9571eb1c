"""Whole-checkpoint conversion: Hugging Face safetensors <-> Megatron-Core `torch_dist`, streaming.

    import_checkpoint(hf_dir, mcore_dir, dtype=torch.bfloat16)
    export_checkpoint(mcore_dir, hf_dir, dtype="source")     # or "bf16"

Import reads each Hugging Face tensor once, dequantises FP8/FP4, assembles each
Megatron-Core tensor from its official tensors as the conversion plan says
(`bridge.conversion_plan`: w1/w3 copied into place in `linear_fc1`) and writes it
straight into the Megatron-Core checkpoint (see `bridge.mcore_checkpoint`), so
memory holds a few tensors, never the model. Beside the Megatron-Core files it
writes `dsv4_bridge/`: the official-flavour `config.json` (enough to rebuild the
model), `source.json` (each official tensor's stored format), the original
FP8/FP4 scales and, byte for byte, the tensors of parts of the release it does
not build (a draft head, a vision encoder and aligner), which export writes back.
Export reads the Megatron-Core tensors back in bounded groups and, with
`dtype="source"`, re-quantises each tensor to its source format, reusing the
original scale of every block the weights still fit exactly (bit-identical bytes
when the weights did not change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import threading
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from bridge.checkpoint_dirs import (
    CARRIED_DIR,
    CONFIG_FILE,
    RECORD_DIR,
    RECORD_FILE,
    SCALES_DIR,
    SOURCE_FILES_DIR,
    resolve_checkpoint,
)
from bridge.conversion_plan import ConversionPlan, TensorPlan
from bridge.hf_config import OFFICIAL as OFFICIAL_FLAVOUR
from bridge.hf_config import (
    DeepSeekV4HFConfig,
    read_hf_config,
    transformer_config,
    official_config_dict,
    transformers_config,
    write_official_config,
)
from bridge.hf_naming import NAMINGS, TRANSFORMERS_MODULE, TRANSLATORS
from bridge.hf_source import CheckpointError, HFSource, carried_mtp_layers
from bridge.integrity import Checksums, refuse_nonfinite, tensor_digest, write_checksums
from bridge.mcore_checkpoint import (
    CheckpointReader,
    build_meta_model,
    parameter_sharding,
    with_dtypes,
    write_checkpoint,
)
from bridge.hf_naming import OFFICIAL
from bridge.mcore_naming import SEQUENTIAL_EXPERTS, detect_expert_form
from bridge.output_dir import atomic_output_dir
from bridge.progress import Progress
from bridge.quantisation import FP4, SourceFormat, dtype_name, release_plain_format, requantise, scale_name
from bridge.safetensors_io import INDEX_FILE, PlannedTensor, SafetensorsCheckpoint, SafetensorsWriter, write_safetensors
from bridge.workers import Jobs, run_workers
from megatron_v4.model import DeepSeekV4Model
from megatron_v4.runtime import destroy, initialize

RECORD_FORMAT = "megatron_v4.bridge.source/2"
EXPORT_DTYPES = ("source", "bf16")
DEFAULT_SHARD_BYTES = 1 << 30
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
    expert_form: str
    tensors: dict[str, SourceFormat] = field(default_factory=dict)
    """Each official tensor's stored format in the source checkpoint."""
    fresh: bool = False
    """No source checkpoint (a model trained from random init): every tensor has the release's plain
    dtype (`release_plain_format`) and `tensors` is empty."""
    shard_bytes: int | None = None
    """The source's largest safetensors file: export writes shards of that size by default."""

    def format_of(self, official: str) -> SourceFormat | None:
        return release_plain_format(official, torch.int64 if official.endswith("tid2eid") else torch.bfloat16) \
            if self.fresh else self.tensors.get(official)

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

    def for_model(self, dtype: torch.dtype, mtp_num_layers: int, expert_form: str) -> SourceRecord:
        """This record describing a model of this dtype, MTP depth and expert form (a training run's)."""
        return dataclasses.replace(self, dtype=dtype_name(dtype), mtp_num_layers=mtp_num_layers,
                                   expert_form=expert_form)


def record_of_hf_checkpoint(hf_dir: str | os.PathLike) -> SourceRecord:
    """The record of a model started from a Hugging Face checkpoint's weights (its formats, no scales)."""
    source = HFSource(hf_dir)
    return SourceRecord(
        naming=source.naming,
        config_flavour=source.config.flavour,
        dtype="bfloat16",
        mtp_num_layers=carried_mtp_layers(source.config, source.names()),
        expert_form=SEQUENTIAL_EXPERTS,
        tensors={name: stored.format for name, stored in source.tensors.items()},
    )


def fresh_record(config: DeepSeekV4HFConfig) -> SourceRecord:
    """The record of a model with no source checkpoint (random init), exported in official naming."""
    return SourceRecord(naming=OFFICIAL, config_flavour=config.flavour, dtype="bfloat16",
                        mtp_num_layers=config.num_nextn_predict_layers, expert_form=SEQUENTIAL_EXPERTS, fresh=True)


def write_record(directory: str | os.PathLike, config: DeepSeekV4HFConfig, record: SourceRecord,
                 scales_from: str | os.PathLike | None = None) -> None:
    """`directory/dsv4_bridge/`: what export needs beside the weights (the architecture, the record, and
    the original FP8/FP4 scales, carried tensors and source files of `scales_from`, a checkpoint directory
    holding some)."""
    record_dir = os.path.join(os.fspath(directory), RECORD_DIR)
    os.makedirs(record_dir, exist_ok=True)
    write_official_config(config, record_dir)
    record.save(record_dir)
    for kept in (SCALES_DIR, CARRIED_DIR, SOURCE_FILES_DIR):
        kept_dir = os.path.join(os.fspath(scales_from), RECORD_DIR, kept) if scales_from else None
        if kept_dir and os.path.isdir(kept_dir):
            shutil.copytree(kept_dir, os.path.join(record_dir, kept), dirs_exist_ok=True)
    write_checksums(record_dir)


def _keep_source_files(hf_dir: str, directory: str) -> None:
    """Every file of the source checkpoint but its weights and index, as they are, into `directory`."""
    for root, folders, names in os.walk(hf_dir):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), hf_dir)
            if name.startswith(".") or name.endswith(".safetensors") or relative == INDEX_FILE:
                continue
            os.makedirs(os.path.dirname(os.path.join(directory, relative)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(directory, relative))


def _write_back_source_files(record_dir: str, out_dir: str, recorded: DeepSeekV4HFConfig,
                             written: DeepSeekV4HFConfig) -> None:
    """The source's files into `out_dir`, and its `config.json` with its own keys, order and values, changed
    only where the exported architecture (`written`) differs from the recorded one (`recorded`) (official flavour; otherwise, or
    without source files, the canonical official `config.json`)."""
    kept = os.path.join(record_dir, SOURCE_FILES_DIR)
    raw_path = os.path.join(kept, CONFIG_FILE)
    if not os.path.isfile(raw_path):
        write_official_config(written, out_dir)
        return
    shutil.copytree(kept, out_dir, dirs_exist_ok=True, ignore=lambda d, names: [CONFIG_FILE] if d == kept else [])
    with open(raw_path) as f:
        raw = json.load(f)
    if written == recorded:
        shutil.copy2(raw_path, os.path.join(out_dir, CONFIG_FILE))
        return
    if recorded.flavour != OFFICIAL_FLAVOUR:
        write_official_config(written, out_dir)
        return
    before, after = official_config_dict(recorded), official_config_dict(written)
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key) != after.get(key):
            if key in after:
                raw[key] = after[key]
            else:
                raw.pop(key, None)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")


def _largest_shard(hf_dir: str) -> int | None:
    sizes = [os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    return max(sizes, default=None)


def _carry(source: HFSource, directory: str, max_shard_bytes: int = 256 << 20) -> None:
    """The source's carried tensors into `directory`, as stored (no folder when there are none)."""
    if source.carried:
        write_safetensors(((name, source.checkpoint.get(name)) for name in source.carried), directory,
                          max_shard_bytes)


class _ScaleShards:
    """Original FP8/FP4 scales, written as they arrive (bounded memory); no folder when there are none."""

    def __init__(self, directory: str, max_shard_bytes: int = 256 << 20):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.writer: SafetensorsWriter | None = None
        self.lock = threading.Lock()

    def write(self, name: str, scale: torch.Tensor) -> None:
        with self.lock:  # import's workers write scales from several threads
            if self.writer is None:
                self.writer = SafetensorsWriter(self.directory, self.max_shard_bytes)
            self.writer.write(name, scale)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- a world of one rank ----------------------------------------------------------------------------
@contextlib.contextmanager
def single_rank():
    """Megatron-Core's parallel state for one rank: the caller's (if it is one rank) or a fresh one."""
    ps = parallel_state
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"conversion runs on one rank; this process is set up with tp, pp, ep = {sizes}")
        yield
        return
    initialize()
    try:
        yield
    finally:
        destroy()


def _meta_model(config: DeepSeekV4HFConfig, dtype: torch.dtype, mtp_num_layers: int) -> tuple[dict, dict, str]:
    """(meta model's sharded state dict, its parameter sharding, its expert form) at tp=pp=ep=1."""
    meta = build_meta_model(transformer_config(config, dtype, mtp_num_layers=mtp_num_layers))
    sharded = meta.sharded_state_dict()
    sharding = parameter_sharding(sharded)
    return sharded, sharding, detect_expert_form(sharding)


# --- import -----------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    tensors: int
    source_bytes: int
    written_bytes: int
    seconds: float
    naming: str
    quantised: dict[str, int]
    carried: int = 0
    """Tensors of parts not built (a draft head, a vision encoder), kept byte for byte in the record."""


def import_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
    workers: int = 1,
) -> ImportReport:
    """Hugging Face checkpoint (any naming, config flavour, FP8/FP4 or not) -> Megatron-Core `torch_dist`.

    A NaN or Inf weight is refused, naming the tensor, unless `allow_nonfinite`. `workers` threads
    each convert whole tensors and write their own `.distcp` file.
    """
    source = HFSource(hf_dir)
    _check_config_against_headers(source)
    mtp_num_layers = carried_mtp_layers(source.config, source.names())
    with single_rank():
        sharded, sharding, expert_form = _meta_model(source.config, dtype, mtp_num_layers)
        plan = ConversionPlan(expert_form, {name: stored.format for name, stored in source.tensors.items()})
        tensors = _import_plan(source, sharding, plan)
        sharded = with_dtypes(sharded, {name: dtype for name, (_, dtype) in tensors.items()})
        sharding = parameter_sharding(sharded)
        order = sorted(tensors, key=lambda name: _reading_position(source, tensors[name][0]))
        total = sum(source.stored_bytes(o) for tensor, _ in tensors.values() for o in tensor.official)
        bar = Progress("import", len(source.names()), total, enabled=progress)
        with atomic_output_dir(out_dir, force, inputs=(hf_dir,)) as tmp:
            record_dir = os.path.join(tmp, RECORD_DIR)
            os.makedirs(record_dir)
            scales = _ScaleShards(os.path.join(record_dir, SCALES_DIR))

            def materialise(name: str) -> torch.Tensor:
                tensor, stored_dtype = tensors[name]

                def read(official: str, _) -> torch.Tensor:
                    wanted = stored_dtype if stored_dtype.is_floating_point else torch.float32
                    values, scale = source.read(official, wanted)
                    if not allow_nonfinite:
                        refuse_nonfinite(official, values, source.path)
                    _check_expert_ids(official, values, source.config.num_routed_experts)
                    if scale is not None:
                        scales.write(scale_name(official), scale)
                    bar.update(source.stored_bytes(official))
                    return _cast(official, values, stored_dtype)

                return tensor.assemble(read, dtype=stored_dtype).reshape(sharding[name].data.shape)

            written = Progress("written", len(tensors), 0, enabled=False)
            digests = {}

            def on_written(name: str, tensor: torch.Tensor) -> None:
                written.update(tensor.nbytes)
                digests[name] = tensor_digest(tensor)

            write_checkpoint(tmp, sharded, materialise, order=order, on_written=on_written, workers=workers)
            scales.close()
            _carry(source, os.path.join(record_dir, CARRIED_DIR))
            _keep_source_files(source.path, os.path.join(record_dir, SOURCE_FILES_DIR))
            write_official_config(source.config, record_dir)
            record = SourceRecord(
                naming=source.naming,
                config_flavour=source.config.flavour,
                dtype=dtype_name(dtype),
                mtp_num_layers=mtp_num_layers,
                expert_form=expert_form,
                tensors=plan.formats,
                shard_bytes=_largest_shard(source.path),
            )
            record.save(record_dir)
            write_checksums(record_dir, digests)
        bar.close()
    quantised: dict[str, int] = {}
    for name in source.names():
        kind = source.tensors[name].format.quant or source.tensors[name].format.dtype
        quantised[kind] = quantised.get(kind, 0) + 1
    return ImportReport(len(source.names()), total, written.bytes, bar.seconds, source.naming, quantised,
                        len(source.carried))


def _check_config_against_headers(source: HFSource) -> None:
    """config.json's layer and expert counts and embedding size against the tensors, before any model is
    built (a wrong count would otherwise build a model of that size first)."""
    config, names = source.config, source.names()
    counted = {
        "num_hidden_layers": (config.num_layers, r"^layers\.(\d+)\."),
        "n_routed_experts": (config.num_routed_experts, r"^layers\.\d+\.ffn\.experts\.(\d+)\."),
    }
    for key, (value, pattern) in counted.items():
        numbered = {name: int(m.group(1)) for name, m in zip(names, map(re.compile(pattern).match, names)) if m}
        beyond = [name for name, i in numbered.items() if i >= value]
        if beyond:
            raise CheckpointError(f"tensor {beyond[0]!r} is beyond config.json's {key} {value}; "
                                  "the config does not match the tensors")
        if 1 + max(numbered.values(), default=-1) != value:
            raise CheckpointError(f"config.json has {key} {value} but the tensors hold "
                                  f"{1 + max(numbered.values(), default=-1)}; the config does not match the tensors")
    embed = source.tensors.get("embed.weight")
    if embed is not None and tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"tensor 'embed.weight' has shape {tuple(embed.shape)} but config.json's vocab_size, "
                              f"hidden_size are ({config.vocab_size!r}, {config.hidden_size!r}); the config does not "
                              "match the tensors")


def _import_plan(source: HFSource, sharding: dict, plan: ConversionPlan) -> dict[str, tuple[TensorPlan, torch.dtype]]:
    """Model parameter -> (its conversion plan, the dtype to store it in); checks names and shapes."""
    tensors = {}
    needed = set()
    for name, sharded in sharding.items():
        tensor = plan.tensor(name)
        needed.update(tensor.official)
        missing = [o for o in tensor.official if o not in source.tensors]
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]!r} is missing from the checkpoint (a model of this config.json needs it)"
            )
        expected = tensor.official_shape(sharded.data.shape)
        for o in tensor.official:
            _check_plain_dtype(o, source.tensors[o].format)
            got = source.tensors[o].shape
            if tuple(got) != tuple(expected):
                raise CheckpointError(
                    f"tensor {o!r} has shape {tuple(got)} but config.json implies {expected}; "
                    "the config does not match the tensors"
                )
        tensors[name] = (tensor, _stored_dtype(tensor, sharded.data.dtype))
    extra = [o for o in source.names() if o not in needed]
    if extra:
        raise CheckpointError(
            f"tensor {extra[0]!r} is in the checkpoint but not in a model of its config.json "
            f"({len(extra)} such tensors); the config does not match the tensors"
        )
    return tensors


PLAIN_DTYPES = {"bfloat16", "float32", "int64"}
"""The unquantised dtypes the releases store (int64 for `tid2eid` alone); others would be cast silently."""


def _check_plain_dtype(official: str, fmt: SourceFormat) -> None:
    if fmt.quant is None and fmt.dtype not in PLAIN_DTYPES:
        wanted = release_plain_format(official, fmt.torch_dtype).dtype if fmt.torch_dtype.is_floating_point else "int64"
        raise CheckpointError(f"tensor {official!r} is {fmt.dtype}; the release format stores it as {wanted}: "
                              "convert it to that dtype first")


def _stored_dtype(tensor: TensorPlan, model_dtype: torch.dtype) -> torch.dtype:
    """The model's dtype, but never below the source's precision (fp32 tensors stay fp32)."""
    for o, fmt in zip(tensor.official, tensor.formats):
        if fmt.quant is None and model_dtype.is_floating_point != fmt.torch_dtype.is_floating_point:
            kind = "a floating-point" if model_dtype.is_floating_point else "an integer"
            raise CheckpointError(f"tensor {o!r} is {fmt.dtype}; the model expects {kind} tensor")
    if model_dtype.is_floating_point and any(
        fmt.quant is None and fmt.torch_dtype.itemsize > model_dtype.itemsize for fmt in tensor.formats
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


def _check_expert_ids(official: str, values: torch.Tensor, experts: int) -> None:
    """A hash-routing table (`tid2eid`: token id -> expert ids) must name existing experts."""
    if official.endswith("tid2eid") and values.numel() and not (0 <= values.min() <= values.max() < experts):
        raise CheckpointError(f"tensor {official!r} holds expert ids from {int(values.min())} to {int(values.max())}; "
                              f"config.json has n_routed_experts {experts}, so ids must lie in 0..{experts - 1}")


def _reading_position(source: HFSource, tensor: TensorPlan) -> tuple:
    """Sort key reading the source files in order (one file after the other)."""
    return (source.file_of(tensor.official[0]), tensor.official[0])


# --- export -----------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    tensors: int
    written_bytes: int
    seconds: float
    fresh_scale_blocks: int = 0
    quantised_tensors: int = 0
    files: list[str] = field(default_factory=list)
    carried: int = 0


ExportForm = SourceFormat | torch.dtype
"""What export writes for one official tensor: the quantised format to re-apply, or a plain dtype."""


def export_form(official: str, fmt: SourceFormat | None, dtype: str) -> ExportForm:
    """The one decision of an exported tensor's format (see `export_checkpoint`'s `dtype`)."""
    if fmt is None:
        raise CheckpointError(f"tensor {official!r} has no entry in the import record {RECORD_DIR}/{RECORD_FILE}")
    if fmt.quant is None:
        return fmt.torch_dtype
    return fmt if dtype == "source" else torch.bfloat16


def _announced(official: str, form: ExportForm, shape: tuple[int, ...]) -> list[PlannedTensor]:
    """The tensors export writes for `official`, announced to the safetensors writer."""
    if isinstance(form, torch.dtype):
        return [PlannedTensor(official, form, shape)]
    rows, cols = shape
    stored = (rows, cols // 2) if form.quant == FP4 else shape
    blocks = (-(-rows // form.block[0]), -(-cols // form.block[1]))
    return [PlannedTensor(official, form.torch_dtype, stored),
            PlannedTensor(scale_name(official), getattr(torch, form.scale_dtype), blocks)]


def export_checkpoint(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "source",
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: bool = True,
    iteration: int | None = None,
    allow_nonfinite: bool = False,
    workers: int = 1,
) -> ExportReport:
    """Megatron-Core checkpoint -> official safetensors. `mcore_dir` is an import (maybe trained since),
    a training save directory (its latest iteration, or `iteration`) or one of its `iter_*` directories.

    `dtype="source"` re-quantises each tensor to the format it had in the source checkpoint;
    `"bf16"` writes the FP8/FP4 and bf16 tensors as bf16 (fp32 and integer ones keep their dtype).
    Every tensor and record file is checked against the import's checksums; a NaN or Inf weight is
    refused unless `allow_nonfinite`. Shards are `max_shard_bytes` at most (default: the source's
    largest shard, else 1 GB); the source's other files (tokenizer, generation config, ...) come back
    as they were, and its `config.json` with its own key order. `workers` threads each read, convert and
    write groups of tensors (each to its place in the planned shards).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use one of {EXPORT_DTYPES}")
    given, mcore_dir = mcore_dir, resolve_checkpoint(mcore_dir, iteration)
    checksums = Checksums(mcore_dir)
    record = SourceRecord.load(mcore_dir)
    config = read_hf_config(os.path.join(mcore_dir, RECORD_DIR))
    originals = _record_tensors(mcore_dir, SCALES_DIR)
    carried = _record_tensors(mcore_dir, CARRIED_DIR)
    prefix = NAMINGS[record.naming].prefix
    report = ExportReport(len(record.tensors), 0, 0.0)
    with single_rank():
        sharded, sharding, _ = _meta_model(config, getattr(torch, record.dtype), record.mtp_num_layers)
        plan = ConversionPlan(record.expert_form)
        forms, announced = {}, []
        for name, tensor_sharding in sharding.items():
            tensor = plan.tensor(name)
            for official in tensor.official:
                forms[official] = export_form(official, record.format_of(official), dtype)
                announced += _announced(prefix + official, forms[official],
                                        tensor.official_shape(tensor_sharding.data.shape))
        carried_names = carried.names() if carried else []
        announced += [PlannedTensor(n, carried.headers[n].dtype, carried.headers[n].shape) for n in carried_names]
        reader = CheckpointReader(mcore_dir, sharded)
        total = sum(math.prod(s.data.shape) * reader.stored_dtype(n).itemsize for n, s in sharding.items())
        bar = Progress("export", len(sharding), total, enabled=progress)
        with atomic_output_dir(out_dir, force, inputs=(given,)) as tmp:
            writer = SafetensorsWriter(tmp, max_shard_bytes or record.shard_bytes or DEFAULT_SHARD_BYTES,
                                       planned=announced)
            jobs = Jobs(reader.groups(sharding, READ_GROUP_BYTES))
            counted = threading.Lock()

            def work(_: int) -> None:
                while (group := jobs.take()) is not None:
                    for name, tensor in reader.read_group(group):
                        bar.update(tensor.nbytes)
                        checksums.check_tensor(name, tensor)
                        if not allow_nonfinite:
                            refuse_nonfinite(name, tensor, mcore_dir)
                        for official, piece in plan.tensor(name).split(tensor):
                            written, fresh_blocks = _exported(official, piece, forms[official], originals)
                            for written_name, written_tensor in written:
                                writer.write(prefix + written_name, written_tensor)
                            if fresh_blocks is not None:
                                with counted:
                                    report.quantised_tensors += 1
                                    report.fresh_scale_blocks += fresh_blocks

            run_workers(work, workers, jobs)
            for name in carried_names:
                writer.write(name, carried.get(name))
            report.carried = len(carried_names)
            report.files = writer.close()
            written_config = config
            if dtype == "bf16":
                written_config = dataclasses.replace(config, quantization_config=None, expert_dtype=None,
                                                     dtype="bfloat16")
            _write_back_source_files(os.path.join(mcore_dir, RECORD_DIR), tmp, config, written_config)
            report.written_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in report.files)
        bar.close()
    report.seconds = bar.seconds
    return report


def _record_tensors(mcore_dir: str, kept: str) -> SafetensorsCheckpoint | None:
    """The record's original scales (`SCALES_DIR`) or carried tensors (`CARRIED_DIR`), if it has some."""
    directory = os.path.join(mcore_dir, RECORD_DIR, kept)
    return SafetensorsCheckpoint(directory) if os.path.isdir(directory) else None


def _exported(official: str, tensor: torch.Tensor, form: ExportForm, originals):
    """([(name, tensor)] export writes for one official tensor in its export form, the number of its blocks
    that got a fresh scale (None if it is not quantised))."""
    if isinstance(form, torch.dtype):
        return [(official, tensor.to(form))], None
    original = originals.get(scale_name(official)) if originals is not None else None
    stored, scale, fresh = requantise(tensor.contiguous(), form, original)
    return [(official, stored.view(form.torch_dtype)), (scale_name(official), scale)], fresh


# --- whole models (small checkpoints; `bridge.verify` checks released sizes layer by layer) -------
def hf_reference_model(hf_dir: str | os.PathLike):
    """transformers' `DeepseekV4ForCausalLM` (fp32) with the checkpoint's weights, dequantised.

    Holds the whole model: for checking small checkpoints, not for the released ones.
    """
    from transformers import DeepseekV4ForCausalLM  # heavy: imported only when a reference is asked for

    source = HFSource(hf_dir)
    model = DeepseekV4ForCausalLM(transformers_config(source.config)).eval()
    official = ((name, _as_fp32(source.read(name)[0])) for name in source.names() if not name.startswith("mtp."))
    module_state = dict(TRANSLATORS[TRANSFORMERS_MODULE].from_official(
        official, num_experts=source.config.num_routed_experts))
    model.load_state_dict(module_state, strict=True)
    return model


def _as_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def load_model_weights(model: DeepSeekV4Model, checkpoint_dir: str | os.PathLike, check_tensor=None) -> None:
    """The model weights of a `torch_dist` checkpoint (an import or a training checkpoint, whose optimizer,
    scheduler and RNG states are left on disk), at the model's parallel layout; `check_tensor(name, tensor)`
    sees each tensor as stored.

    Only tensors are read (`CheckpointReader`): the pickled `_extra_state` objects, which
    `dist_checkpointing.load` would unpickle with `weights_only=False`, stay unread.
    """
    sharded = model.sharded_state_dict()
    reader = CheckpointReader(os.fspath(checkpoint_dir), sharded)
    tensors = {}
    for name, tensor in reader.read(parameter_sharding(sharded), max_group_bytes=READ_GROUP_BYTES):
        if check_tensor is not None:
            check_tensor(name, tensor)
        tensors[name] = tensor
    model.load_state_dict(tensors, strict=False)


def load_megatron_model(mcore_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        iteration: int | None = None, check_tensor=None, **config_overrides):
    """`DeepSeekV4Model` (this rank's pipeline stage and shards), in eval mode, with the weights of an
    import or a training checkpoint (see `export_checkpoint` for `mcore_dir` and `iteration`;
    `load_model_weights` for `check_tensor`).

    Extra keyword arguments go to the `DeepSeekV4TransformerConfig`.
    """
    mcore_dir = resolve_checkpoint(mcore_dir, iteration)
    record = SourceRecord.load(mcore_dir)
    config = read_hf_config(os.path.join(mcore_dir, RECORD_DIR))
    model = DeepSeekV4Model(
        transformer_config(config, dtype, mtp_num_layers=record.mtp_num_layers, **config_overrides),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        max_sequence_length=config.max_position_embeddings,
    ).eval()
    load_model_weights(model, mcore_dir, check_tensor)
    return model
