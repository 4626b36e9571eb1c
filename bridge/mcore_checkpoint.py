"""Megatron-Core `torch_dist` checkpoints of `DeepSeekV4Model`, written and read one tensor at a time.

`dist_checkpointing.save(model.sharded_state_dict(), dir)` needs the whole model
in memory. Here the model is built on the meta device (no storage): its
`sharded_state_dict()` gives exactly the keys, global shapes, offsets and
factories that Megatron-Core saves and loads, and Megatron-Core's own translation
to PyTorch Distributed Checkpoint (DCP) items is reused. Only the data is
different: each DCP write item is materialised when the writer reaches it (from a
callback such as "read, dequantise and fuse this tensor from the Hugging Face
checkpoint"), written, and dropped. Reading goes the other way: parameters are
loaded in groups of bounded size through DCP, which reads only their bytes.

The result is an ordinary Megatron-Core checkpoint: it loads with
`dist_checkpointing.load(model.sharded_state_dict(), dir)` at any TP/PP/EP.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import math
import os
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed.checkpoint as dcp
import torch.utils.serialization.config as serialization_config
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from bridge.file_mapping import MAP_MIN_BYTES, map_file_range
from bridge.workers import Jobs, run_workers
from megatron_v4.model import DeepSeekV4Model

Materialise = Callable[[str], torch.Tensor]
"""Model parameter name -> its full tensor (in the parameter's shape)."""


# --- the model's checkpoint keys and shapes -------------------------------------------------------------
def build_meta_model(transformer_config):
    """`DeepSeekV4Model` on the meta device: every shape and checkpoint key, no storage, no initialisation.

    Needs `megatron_v4.initialize()` (a world of one is enough).
    """
    config = dataclasses.replace(transformer_config, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        return DeepSeekV4Model(config, pre_process=True, post_process=True)


def parameter_sharding(sharded_state_dict: dict) -> dict[str, ShardedTensor | ShardedTensorFactory]:
    """Model parameter (and buffer) name -> the sharded tensor or factory it is saved through."""
    return {
        name: sharded
        for name, sharded in sharded_state_dict.items()
        if isinstance(sharded, (ShardedTensor, ShardedTensorFactory))
    }


def with_dtypes(sharded_state_dict: dict, dtypes: dict[str, torch.dtype]) -> dict:
    """The state dict with some parameters saved in other dtypes (e.g. fp32 source tensors of a bf16 model).

    Loading casts them to the model's dtype; the checkpoint keeps their precision.
    """
    out = dict(sharded_state_dict)
    for name, dtype in dtypes.items():
        sharded = out[name]
        if sharded.data.dtype == dtype:
            continue
        changes = {"data": sharded.data.to(dtype)}
        if isinstance(sharded, ShardedTensor):
            changes["dtype"] = dtype
        out[name] = dataclasses.replace(sharded, **changes)
    return out


def _structure(sharded: ShardedTensor | ShardedTensorFactory, data: torch.Tensor | None = None):
    """What a parameter is saved as: a ShardedTensor, or what its factory builds (optionally over real `data`)."""
    if data is not None:
        sharded = dataclasses.replace(sharded, data=data)
    return sharded if isinstance(sharded, ShardedTensor) else sharded.build()


def _sharded_tensors(structure) -> list[ShardedTensor]:
    if isinstance(structure, ShardedTensor):
        return [structure]
    if isinstance(structure, ShardedTensorFactory):
        return _sharded_tensors(structure.build())
    values = structure.values() if isinstance(structure, dict) else structure
    return [t for v in values for t in _sharded_tensors(v)]


def _built(sharded: ShardedTensor | ShardedTensorFactory, data: torch.Tensor | None = None) -> list[ShardedTensor]:
    """The ShardedTensors a parameter is saved as (a factory builds several), optionally over real `data`."""
    return _sharded_tensors(_structure(sharded, data))


def _chunk_id(sharded: ShardedTensor) -> tuple[str, tuple[int, ...]]:
    return sharded.key, tuple(sharded.global_offset)


# --- writing --------------------------------------------------------------------------------------------
class _LazySavePlanner(MCoreSavePlanner):
    """Megatron-Core's save planner, whose tensor items are materialised per parameter by the writer.

    Items are ordered by their parameter's place in `order`, so that the source is read
    in order; `chunks(name)` materialises one parameter and gives the data of each of
    its chunks (a factory saves several).
    """

    def __init__(self, owner_of: dict, sharding: dict, order: list[str], materialise: Materialise, on_written):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)
        self.owner_of, self.sharding, self.materialise, self.on_written = owner_of, sharding, materialise, on_written
        self.position = {name: i for i, name in enumerate(order)}

    def create_local_plan(self):
        plan = super().create_local_plan()
        self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=self.place))
        return self.plan

    def place(self, item) -> int:
        if item.type == WriteItemType.BYTE_IO:
            return -1
        return self.position[self.owner(item)]

    def owner(self, item) -> str | None:
        """The parameter a tensor item belongs to (None for a bytes item)."""
        if item.type == WriteItemType.BYTE_IO:
            return None
        return self.owner_of[(item.index.fqn, tuple(item.index.offset))]

    def chunks(self, name: str) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
        full = self.materialise(name)
        chunks = {_chunk_id(s): s.data for s in _built(self.sharding[name], full)}
        self.on_written(name, full)
        return chunks


def _own_storage(data: torch.Tensor) -> torch.Tensor:
    """`data` as a tensor whose storage holds exactly its bytes (`torch.save` writes a tensor's whole
    storage): a contiguous view shares the parent's memory through a storage slice; others are copied."""
    if data.untyped_storage().nbytes() == data.nbytes:
        return data
    if not data.is_contiguous():
        return data.contiguous()
    begin = data.storage_offset() * data.element_size()
    storage = data.untyped_storage()[begin:begin + data.nbytes]
    return torch.empty(0, dtype=data.dtype).set_(storage, 0, data.shape)


class _StreamingWriter(FileSystemWriter):
    """DCP's file writer with `workers` threads, each writing whole parameters into its own `.distcp`
    file, one item at a time, keeping no reference to written data.

    (DCP's own loop keeps every tensor of a file alive until the file is complete.) The
    threads take parameters in order from one queue; torch's copies and arithmetic,
    SHA-256 and file I/O release the GIL, so reading, converting and writing overlap.
    """

    def __init__(self, path: str, workers: int = 1):
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.workers = workers

    def write_data(self, plan, planner: _LazySavePlanner) -> torch.futures.Future:
        by_owner: dict[str | None, list] = {}
        for item in plan.items:
            by_owner.setdefault(planner.owner(item), []).append(item)
        jobs = Jobs(list(by_owner.items()))
        lock = threading.Lock()
        results: list[WriteResult] = []

        def work(index: int) -> None:
            file_name = f"{plan.storage_data.prefix}{index}.distcp"
            path = os.path.join(self.path, file_name)
            job = jobs.take()
            if job is None:
                return  # more workers than parameters: no empty file
            # The zip records' CRC-32 would double torch.save's time; DCP files carry no checksum that is checked
            # on loading, and ours are in the bridge's checksums.json. (The setting is per thread.)
            try:
                with serialization_config.patch({"save.compute_crc32": False}), open(path, "wb") as stream:
                    while job is not None:
                        written = self._write_job(stream, file_name, planner, *job)
                        with lock:
                            results.extend(written)
                        job = jobs.take()
                    stream.flush()
                    os.fsync(stream.fileno())
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise OSError(e.errno, f"{e.strerror} while writing {path}; free some space or choose another "
                              "--out") from e  # a full disk names no file by itself

        run_workers(work, self.workers, jobs)
        future = torch.futures.Future()
        future.set_result(results)
        return future

    @staticmethod
    def _write_job(stream, file_name: str, planner: _LazySavePlanner, owner: str | None, items) -> list[WriteResult]:
        chunks = planner.chunks(owner) if owner is not None else {}
        results = []
        for item in items:
            if owner is None:
                data = planner.resolve_data(item)
            else:
                data = chunks.pop((item.index.fqn, tuple(item.index.offset)))
                data = _own_storage(data.reshape(item.tensor_data.chunk.sizes))
            offset = stream.tell()
            if item.type == WriteItemType.BYTE_IO:
                stream.write(data.getbuffer())
            else:
                torch.save(data, stream)
            del data
            length = stream.tell() - offset
            results.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(file_name, offset, length)))
        return results


def write_checkpoint(
    out_dir: str,
    sharded_state_dict: dict,
    materialise: Materialise,
    order: Iterable[str] | None = None,
    on_written: Callable[[str, torch.Tensor], None] = lambda name, tensor: None,
    workers: int = 1,
) -> None:
    """Write a Megatron-Core `torch_dist` checkpoint of a (meta) model's `sharded_state_dict()`.

    `materialise(name)` gives each parameter's full tensor, called once per parameter,
    in `order` (default: the state dict's) by `workers` threads, each writing its own
    `.distcp` file (one `.metadata` describes them all). `on_written(name, tensor)` follows
    each call, in the same thread; both must be thread-safe when `workers > 1`.
    """
    sharding = parameter_sharding(sharded_state_dict)
    order = list(order) if order is not None else list(sharding)
    owner_of = {_chunk_id(s): name for name in order for s in _built(sharding[name])}
    if set(order) != set(sharding):
        extra, missing = sorted(set(order) - set(sharding)), sorted(set(sharding) - set(order))
        raise KeyError(f"write order differs from the model's tensors: extra {extra[:3]}, missing {missing[:3]}")

    # Megatron-Core's translation reshapes the ShardedTensors it is given: hand it copies
    sharded_part, common = save_preprocess({k: copy.copy(v) for k, v in sharded_state_dict.items()},
                                           validate_access_integrity=False)
    sharded_part["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=0)
    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_part, keep_only_main_replica=True)
    pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)

    planner = _LazySavePlanner(owner_of, sharding, order, materialise, on_written)
    writer = _StreamingWriter(out_dir, workers)
    try:
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:
        # DCP wraps whatever its one rank raised, Ctrl-C included: raise that itself, so that an interrupt
        # stays a KeyboardInterrupt and a full disk an OSError naming the file
        (raised, _), *_ = e.failures.values()
        raise raised from None
    strategy = TorchDistSaveShardedStrategy()
    save_config(CheckpointingConfig(strategy.backend, strategy.version), out_dir)


# --- reading --------------------------------------------------------------------------------------------
METADATA_FILE = ".metadata"
"""DCP's pickled index of a checkpoint (torch/distributed/checkpoint/filesystem.py)."""
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"BytesStorageMetadata", "ChunkStorageMetadata", "Metadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # Megatron-Core's training saves also keep the save plans (plain dataclasses and an enum).
    "torch.distributed.checkpoint.planner": {"SavePlan", "TensorWriteData", "WriteItem", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
"""The only globals a `.metadata` pickle may name (and torch dtypes): plain data, nothing that runs code."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses any other global, so that a crafted `.metadata` cannot run code
    (https://docs.python.org/3/library/pickle.html#restricting-globals)."""

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")


def read_metadata(checkpoint_dir: str | os.PathLike) -> Metadata:
    """A `torch_dist` checkpoint's DCP metadata, unpickled with `_MetadataUnpickler`."""
    path = os.path.join(os.fspath(checkpoint_dir), METADATA_FILE)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; not a Megatron-Core torch_dist checkpoint") from None
    except Exception as e:  # a damaged pickle raises anything from EOFError to TypeError
        raise ValueError(f"{path}: refused, not a checkpoint's metadata ({e}); the checkpoint is damaged "
                         "or was not written by PyTorch") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path}: refused, holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with `read_metadata` above instead of its plain `pickle.load`, and tensors stored
    plainly mapped from their record's storage bytes: no unpickling, and none of torch.load's copies."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.stored_chunks = {
            (fqn, tuple(chunk.offsets)): (tuple(chunk.sizes), stored.properties.dtype)
            for fqn, stored in metadata.state_dict_metadata.items()
            if isinstance(stored, TensorStorageMetadata)
            for chunk in stored.chunks
        }

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future:
        others = []
        for item in plan.items:
            data = self._mapped(item)
            if data is None:
                others.append(item)
                continue
            data = _narrowed(data, item.storage_offsets, item.lengths)
            if not (isinstance(planner, _IntoTensors) and planner.adopt(item, data)):
                target = planner.resolve_tensor(item).detach()
                target.copy_(data)
                planner.commit_tensor(item, target)
        if others:
            return super().read_data(dataclasses.replace(plan, items=others), planner)
        future = torch.futures.Future()
        future.set_result(None)
        return future

    def _mapped(self, item) -> torch.Tensor | None:
        """The stored chunk `item` reads from, mapped (None: small, transformed, or not one plain storage)."""
        info = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or info.transform_descriptors:
            return None
        sizes, dtype = self.stored_chunks[(item.storage_index.fqn, tuple(item.storage_index.offset))]
        nbytes = math.prod(sizes) * dtype.itemsize
        if nbytes < MAP_MIN_BYTES:
            return None
        path = os.path.join(self.path, info.relative_path)
        with open(path, "rb", buffering=0) as f:
            storage = _record_storage(f, info.offset, info.length)
            if storage is None or storage[1] != nbytes:
                return None
            data = map_file_range(f, info.offset + storage[0], nbytes, f"{path}: {item.storage_index.fqn}")
        return data.view(dtype).view(sizes)


def _narrowed(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    """The block of `tensor` from `offsets` with `lengths` along its leading dims (a view)."""
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class _FileWindow(io.RawIOBase):
    """`length` bytes of an open file from `offset`, as a seekable stream (for `zipfile`), read with pread."""

    def __init__(self, f, offset: int, length: int):
        self.fd, self.offset, self.length, self.position = f.fileno(), offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence] + position
        return self.position

    def readinto(self, buffer) -> int:
        wanted = max(0, min(len(buffer), self.length - self.position))
        got = os.preadv(self.fd, [memoryview(buffer)[:wanted]], self.offset + self.position) if wanted else 0
        self.position += got
        return got


def _record_storage(f, offset: int, length: int) -> tuple[int, int] | None:
    """(start within the record, size) of the single storage (`<archive>/data/0`, stored uncompressed) of the
    torch.save record at [offset, offset + length) of `f`; None if the record is anything else."""
    try:
        with zipfile.ZipFile(_FileWindow(f, offset, length)) as archive:
            storages = [entry for entry in archive.infolist() if entry.filename.rsplit("/", 2)[-2:-1] == ["data"]]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
        return None
    local_header = os.pread(f.fileno(), 30, offset + storages[0].header_offset)
    if len(local_header) != 30 or local_header[:4] != b"PK\x03\x04":
        return None
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    return storages[0].header_offset + 30 + name_length + extra_length, storages[0].file_size


class _IntoTensors(LoadPlanner):
    """A DCP load planner that copies each read into a tensor chosen per read item (no state dict)."""

    def __init__(self, destinations: dict[int, torch.Tensor]):
        self.destinations = destinations

    def set_up_planner(self, *args, **kwargs):
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise NotImplementedError("only tensors are read")

    def adopt(self, read_item, data: torch.Tensor) -> bool:
        """Take `data` itself as the destination when it fills all of it (no copy); False otherwise."""
        slot = read_item.dest_index.index
        if any(read_item.dest_offsets) or tuple(read_item.lengths) != tuple(self.destinations[slot].shape):
            return False
        self.destinations[slot] = data.view(self.destinations[slot].shape)
        return True

    def resolve_tensor(self, read_item):
        return _narrowed(self.destinations[read_item.dest_index.index], read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor):
        pass


class CheckpointReader:
    """Reads full model tensors from a `torch_dist` checkpoint, whatever layout it was saved in."""

    def __init__(self, checkpoint_dir: str, sharded_state_dict: dict):
        self.reader = _SafeReader(checkpoint_dir)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.sharding = parameter_sharding(sharded_state_dict)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the checkpoint holds a parameter in."""
        return self._stored(_built(self.sharding[name])[0].key).properties.dtype

    def _stored(self, key: str):
        stored = self.metadata.state_dict_metadata.get(key)
        if stored is None:
            raise KeyError(f"the Megatron-Core checkpoint has no tensor {key!r}")
        return stored

    def read(self, names: Iterable[str], max_group_bytes: int = 1 << 30) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor in its stored dtype) of model parameters, loaded in groups of bounded size."""
        for group in self.groups(names, max_group_bytes):
            yield from self.read_group(group)

    def groups(self, names: Iterable[str], max_group_bytes: int) -> Iterator[list[str]]:
        """`names` in consecutive groups of at most `max_group_bytes` (or one parameter), each one DCP read."""
        group, group_bytes = [], 0
        for name in names:
            if name not in self.sharding:
                raise KeyError(f"the model has no checkpointed tensor {name!r}")
            data = self.sharding[name].data
            size = data.numel() * data.element_size()
            if group and group_bytes + size > max_group_bytes:
                yield group
                group, group_bytes = [], 0
            group.append(name)
            group_bytes += size
        if group:
            yield group

    def read_group(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of each parameter of a group, read in one DCP read (threads may read at once)."""
        items, destinations, pieces = [], {}, {}
        structures = {name: _structure(self.sharding[name]) for name in names}
        for name in names:
            pieces[name] = []
            for sharded in _sharded_tensors(structures[name]):
                stored = self._stored(sharded.key)
                chunk_shape = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
                if tuple(stored.size) != tuple(sharded.global_shape):
                    raise ValueError(
                        f"{sharded.key}: the checkpoint holds shape {tuple(stored.size)}, the model "
                        f"{tuple(sharded.global_shape)}; was it written for a different config?"
                    )
                slot = len(destinations)
                destinations[slot] = torch.empty(chunk_shape, dtype=stored.properties.dtype)
                chunk = ChunkStorageMetadata(offsets=torch.Size(sharded.global_offset), sizes=torch.Size(chunk_shape))
                for item in create_read_items_for_chunk_list(sharded.key, stored, [chunk]):
                    items.append(dataclasses.replace(item, dest_index=MetadataIndex(sharded.key, chunk.offsets, slot)))
                pieces[name].append((sharded, slot))
        try:
            self.reader.read_data(LoadPlan(items), _IntoTensors(destinations)).wait()
        except Exception as e:  # torch.load of a damaged file raises anything from EOFError to RuntimeError
            raise ValueError(f"{self.reader.path}: cannot read {names[0]!r} ({type(e).__name__}: {e}); a .distcp "
                             "file of the checkpoint is damaged") from None
        for name in names:
            sharding = self.sharding[name]
            loaded = {id(sh): destinations[slot].view(tuple(sh.local_shape)) for sh, slot in pieces[name]}
            if isinstance(sharding, ShardedTensor):
                yield name, next(iter(loaded.values()))
            else:
                yield name, sharding.merge_fn(_replace_sharded(structures[name], loaded))
            for _, slot in pieces[name]:
                del destinations[slot]


def _replace_sharded(structure, loaded: dict[int, torch.Tensor]):
    """A factory's built structure with each ShardedTensor replaced by its loaded data."""
    if isinstance(structure, ShardedTensor):
        return loaded[id(structure)]
    if isinstance(structure, dict):
        return {k: _replace_sharded(v, loaded) for k, v in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(_replace_sharded(v, loaded) for v in structure)
    return structure
