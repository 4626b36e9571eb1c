"""Patches that let Megatron-Core's parallel code run on CPU with gloo.

Megatron-Core assumes CUDA throughout: RNG trackers read CUDA generator state,
buffers are allocated with `device=torch.cuda.current_device()` or
`device="cuda"`, the MoE dispatchers and schedules open CUDA streams, and a few
collectives that gloo lacks (reduce-scatter) are called directly. None of those
calls can succeed on a machine without a GPU, so redirecting them to the CPU
changes nothing that would otherwise have worked.

`apply()` is called by `megatron_v4.initialize()` only when
`torch.cuda.is_available()` is False, and is idempotent. Each patch below names
the Megatron-Core call site it covers (megatron-core 0.19).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import types

import torch
import torch.distributed as dist

_APPLIED = False
_CPU = torch.device("cpu")


# --------------------------------------------------------------------------- RNG
def _patch_rng_tracker() -> None:
    """tensor_parallel/random.py: CudaRNGStatesTracker.add/fork and the
    `_get_cuda_rng_state`/`_set_cuda_rng_state` helpers read and write the CUDA
    generator. On CPU the tracked states are states of the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Same as the CUDA tracker, without its "CPU RNG changed" warning: here
            # the tracked generator *is* the CPU one.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state


# ------------------------------------------------------------------ device calls
def _patch_current_device() -> None:
    """`torch.cuda.current_device()` is used as an allocation device in ~100 call
    sites (tensor_parallel/mappings.py and layers.py buffers, pipeline_parallel/
    p2p_communication.py shape exchange, transformer/moe/router.py aux-loss
    tensors, optimizer/distrib_optimizer.py). Return the CPU device instead."""
    torch.cuda.current_device = lambda: _CPU


def _patch_tensor_cuda() -> None:
    """`Tensor.cuda()` in tensor_parallel/data.py (broadcast_data) and
    optimizer/distrib_optimizer.py moves buffers to the GPU: keep them on CPU."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _NullStream:
    """Stands in for `torch.cuda.Stream`/`Event`: all work is synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


def _patch_streams() -> None:
    """transformer/moe/token_dispatcher.py (alltoall dispatcher with
    `moe_shared_expert_overlap`), transformer/moe/moe_layer.py and
    pipeline_parallel/utils.py create and switch CUDA streams and events."""
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return _CPU
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


class _TorchWithCpuFactories(types.ModuleType):
    """`torch` as seen from one Megatron-Core module, whose tensor factories
    (`torch.zeros(..., device="cuda")` and friends) allocate on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules that spell `device="cuda"` (or 'cuda') literally, and where.
_LITERAL_CUDA_MODULES = {
    # forward_backward_*: total_num_tokens = torch.zeros([], ..., device="cuda")
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens",
    # get_default_causal_mask / sliding-window masks: torch.ones(sq, sq, device="cuda")
    "megatron.core.transformer.utils": "get_default_causal_mask",
    # get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32
    "megatron.core.optimizer.clip_grads": "total_norm, dummy_overflow_buf",
    # local_multi_tensor_l2_norm (the grad-norm fallback without apex/TE): l2_cuda
    "megatron.core.utils": "l2_cuda",
    # MixedPrecisionOptimizer.found_inf, _scale_one; FP32Optimizer._scale
    "megatron.core.optimizer.optimizer": "found_inf, _scale",
    # LayerWiseDistributedOptimizer.has_grad_norm_group (dist_muon): flag = torch.tensor(..., device='cuda')
    "megatron.core.optimizer.layer_wise_optimizer": "has_grad_norm_group flag",
    # ConstantGradScaler / DynamicGradScaler._scale
    "megatron.core.optimizer.grad_scaler": "_scale",
    # broadcast_data: sizes_cuda = torch.tensor(..., device='cuda')
    "megatron.core.tensor_parallel.data": "sizes_cuda",
    # MoEAlltoAllTokenDispatcher.over_budget flag
    "megatron.core.transformer.moe.token_dispatcher": "over_budget",
    # RerunStateMachine validation-result all-reduce
    "megatron.core.rerun_state_machine": "val_tensor",
    # ParamAndGradBuffer NCCL warm-up tensor
    "megatron.core.distributed.param_and_grad_buffer": "tmp_warmup_tensor",
    # dist_checkpointing: load-plan reuse check and tensor exchange buffers
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "all_results",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange buffers",
}


def _patch_literal_cuda_factories() -> None:
    proxy = _TorchWithCpuFactories()
    for module_name in _LITERAL_CUDA_MODULES:
        importlib.import_module(module_name).torch = proxy


# ------------------------------------------------------------------ collectives
def _reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """gloo has no reduce-scatter: all-reduce a copy and keep this rank's slice."""
    reduced = input.clone()
    dist.all_reduce(reduced, op=op, group=group)
    rank = dist.get_rank(group)
    output.copy_(reduced.chunk(dist.get_world_size(group), dim=0)[rank])
    return _CompletedWork() if async_op else None


class _CompletedWork:
    def wait(self):
        return True


def _patch_reduce_scatter() -> None:
    """tensor_parallel/mappings.py `_reduce_scatter_along_first_dim` (sequence
    parallel, MoE allgather dispatcher) and distributed/param_and_grad_buffer.py
    (distributed optimizer) call `dist.reduce_scatter_tensor`, which gloo lacks."""
    native = dist.reduce_scatter_tensor

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) == "gloo":
            return _reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)
        return native(output, input, op=op, group=group, async_op=async_op)

    dist.reduce_scatter_tensor = reduce_scatter_tensor


def _all_gather_uneven(tensor_list, tensor, group=None):
    """gloo's all_gather needs equal sizes: gather flat copies padded to the longest, then trim."""
    longest = max(t.numel() for t in tensor_list)
    padded_input = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded_input[: tensor.numel()] = tensor.reshape(-1)
    padded = [torch.empty(longest, dtype=tensor.dtype, device=tensor.device) for _ in tensor_list]
    dist.all_gather(padded, padded_input, group=group)
    for out, gathered in zip(tensor_list, padded):
        out.copy_(gathered[: out.numel()].view_as(out))


def _patch_uneven_all_gather() -> None:
    """optimizer/layer_wise_optimizer.py `LayerWiseDistributedOptimizer.allgather_params`
    (dist_muon) all-gathers each rank's flattened parameters with per-rank sizes, which
    NCCL accepts and gloo refuses ("invalid tensor size")."""
    from megatron.core.optimizer import layer_wise_optimizer

    native = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if dist.get_backend(group) == "gloo" and any(t.shape != tensor.shape for t in tensor_list):
            _all_gather_uneven(tensor_list, tensor, group=group)
            return _CompletedWork() if async_op else None
        return native(tensor_list, tensor, group=group, async_op=async_op)

    layer_wise_optimizer.torch = _Overlay(
        layer_wise_optimizer.torch,  # the CPU-factory proxy of _patch_literal_cuda_factories
        distributed=_Overlay(dist, all_gather=all_gather),
    )


class _Overlay:
    """A module seen through a few replaced attributes."""

    def __init__(self, base, **replaced):
        self._base = base
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _patch_tensor_type_names() -> None:
    """optimizer/optimizer.py, optimizer/distrib_optimizer.py and optimizer/clip_grads.py
    accept a parameter or gradient only if `tensor.type()` is a `torch.cuda.*Tensor`
    name. Report CPU tensors under their CUDA type name (only the no-argument query;
    conversions `tensor.type(dtype)` are untouched)."""
    native = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return native(self).replace("torch.", "torch.cuda.", 1)
        return native(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


# ----------------------------------------------------------------------- MoE
def _patch_alltoall_split_sizes() -> None:
    """transformer/moe/token_dispatcher.py `MoEAlltoAllTokenDispatcher` turns the
    per-rank split sizes into host numpy arrays with `maybe_move_tensor_to_cpu(...,
    as_numpy=True)`, which skips tensors that are already on the CPU; gloo's
    `all_to_all_single` then receives tensors instead of sequences and fails."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ------------------------------------------------------------------------ norms
def _patch_torch_norm_sequence_parallel() -> None:
    """transformer/torch_norm.py `WrappedTorchNorm` (the local spec's norm when
    neither TE nor apex is installed) refuses `sequence_parallel`. Under SP each
    TP rank normalises its own slice of the sequence, so the norm weights'
    gradients are partial sums: mark them `sequence_parallel` so that
    `finalize_model_grads` all-reduces them over the TP group, as apex's and
    TE's norms do."""
    from megatron.core.transformer import torch_norm

    native_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return native_new(cls, config, hidden_size, eps, *args, **kwargs)
        unsharded = copy.copy(config)
        unsharded.sequence_parallel = False
        norm = native_new(cls, unsharded, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new


def apply() -> None:
    """Apply every patch once (no-op on later calls)."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_v4.runtime.cpu_compat is for machines without CUDA")
    _patch_rng_tracker()
    _patch_current_device()
    _patch_tensor_cuda()
    _patch_tensor_type_names()
    _patch_streams()
    _patch_literal_cuda_factories()
    _patch_reduce_scatter()
    _patch_uneven_all_gather()
    _patch_torch_norm_sequence_parallel()
    _patch_alltoall_split_sizes()
    _APPLIED = True
