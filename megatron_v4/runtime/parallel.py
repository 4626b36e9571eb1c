"""Process-group and Megatron-Core parallel-state set-up.

`initialize()` is the one call a script, a test rank or a `torchrun` worker
makes before building a model; `destroy()` undoes it so that a process (a test)
can initialise again with another layout.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_v4.runtime import cpu_compat


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes this process was initialised with."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    cp: int = 1
    vpp: int | None = None
    dp: int = 1
    world_size: int = 1
    backend: str = "gloo"

    def config_kwargs(self) -> dict:
        """Keyword arguments that a `TransformerConfig` needs to match this layout."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            sequence_parallel=self.sp,
            context_parallel_size=self.cp,
            # gloo's batched isend/irecv mixes up interleaved-pipeline messages (wrong gradients).
            batch_p2p_comm=self.backend != "gloo",
        )


_LAYOUT: ParallelLayout | None = None
_OWNS_PROCESS_GROUP = False


def _init_process_group(backend: str, timeout_minutes: int) -> bool:
    """Join (or, in a plain single process, create) the default process group.

    Returns True when this call created it, so `destroy()` knows to tear it down.
    """
    if dist.is_initialized():
        return False
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # A plain `python script.py`: a world of one, with an in-process store, so nothing
        # (no port, no RANK/WORLD_SIZE variables) leaks to subprocesses the script starts.
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return True
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def _check_layout(world_size: int, tp: int, pp: int, cp: int, ep: int, etp: int, vpp: int | None) -> int:
    for name, size in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep), ("etp", etp)):
        if size < 1:
            raise ValueError(f"{name}={size}: parallel sizes must be >= 1")
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; "
            f"launch a multiple of {tp * pp * cp} ranks or change tp/pp/cp"
        )
    dp = world_size // (tp * pp * cp)
    if world_size % (etp * ep * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp}; "
            f"launch a multiple of {etp * ep * pp} ranks or change ep/etp"
        )
    if vpp is not None and (vpp < 1 or pp == 1):
        raise ValueError(f"vpp={vpp} needs pp > 1 and vpp >= 1; drop vpp or raise pp")
    return dp


def initialize(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int = 1,
    sp: bool = False,
    cp: int = 1,
    seed: int = 1234,
    vpp: int | None = None,
    backend: str | None = None,
    timeout_minutes: int = 10,
) -> ParallelLayout:
    """Set up torch.distributed and Megatron-Core for the given parallel layout.

    Works in a plain `python` process (a world of one) and under `torchrun`
    (reads RANK/WORLD_SIZE/MASTER_* from the environment). Uses NCCL when CUDA
    is available and gloo otherwise; on a machine without CUDA it first applies
    the CPU compatibility patches of `megatron_v4.runtime.cpu_compat`.

    `cp` splits every sequence into `cp` contiguous chunks, one per context-parallel rank
    (see `megatron_v4.context_parallel`).

    Returns the `ParallelLayout`, whose `config_kwargs()` feed a TransformerConfig.
    """
    global _LAYOUT, _OWNS_PROCESS_GROUP
    if _LAYOUT is not None:
        raise RuntimeError(
            "megatron_v4.initialize() was already called; call megatron_v4.destroy() first"
        )
    if sp and tp == 1:
        raise ValueError("sp=True needs tp > 1 (sequence parallel splits over the TP group)")
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not use_cuda:
        cpu_compat.apply()

    _OWNS_PROCESS_GROUP = _init_process_group(backend, timeout_minutes)
    world_size = dist.get_world_size()
    try:
        dp = _check_layout(world_size, tp, pp, cp, ep, etp, vpp)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=timeout_minutes,
        )
    except Exception:
        destroy()
        raise
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _LAYOUT = ParallelLayout(
        tp=tp, pp=pp, ep=ep, etp=etp, sp=sp, cp=cp, vpp=vpp, dp=dp, world_size=world_size, backend=backend
    )
    return _LAYOUT


def layout() -> ParallelLayout:
    """The layout of the last `initialize()`."""
    if _LAYOUT is None:
        raise RuntimeError("call megatron_v4.initialize() first")
    return _LAYOUT


def destroy() -> None:
    """Tear down Megatron-Core's parallel state (and the process group, if `initialize` made it)."""
    global _LAYOUT, _OWNS_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _LAYOUT = None
