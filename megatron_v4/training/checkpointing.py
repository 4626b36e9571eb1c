"""`torch_dist` training checkpoints: model, optimizer, scheduler, RNG and data position, with the
architecture record that `bridge export` and the other tools read."""

from __future__ import annotations

import os

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge.checkpoint_dirs import LATEST_FILE, iteration_dir, latest_iteration
from bridge.convert import SourceRecord, write_record
from megatron_v4.runtime import layout

OPTIMIZER_SHARDING = "dp_reshardable"
"""How the distributed optimizer's state is saved: resumable at another data-parallel size, not at other
TP/PP/EP sizes (the model weights load at any layout). Megatron-Core's "fully_reshardable" format fails to
load torch.optim.Adam's per-parameter step (needs apex or Transformer Engine's FusedAdam)."""


def _rng_state() -> ShardedObject:
    """This rank's RNG states (one object per pp x tp x cp x dp position; only reloaded at the same layout)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy.random.get_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_context_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout_record() -> dict:
    sizes = layout()
    return {"tp": sizes.tp, "pp": sizes.pp, "cp": sizes.cp, "ep": sizes.ep, "etp": sizes.etp, "dp": sizes.dp}


def _training_state_dict(bare, optimizer, is_loading: bool) -> dict:
    model = bare.sharded_state_dict()
    return {
        "model": model,
        "optimizer": optimizer.sharded_state_dict(
            model, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
        ),
        "rng_state": _rng_state(),
    }


def save_checkpoint(save_dir: str, step: int, bare, optimizer, scheduler, arch, record: SourceRecord,
                    consumed_samples: int, scales_from: str | None = None) -> str:
    """Write `save_dir/iter_<step>` (torch_dist) with its export record (`bridge.convert.write_record`:
    the architecture, `record`, and the original FP8/FP4 scales of `scales_from` if it has some), and
    point `save_dir/latest_checkpointed_iteration.txt` at it."""
    path = iteration_dir(save_dir, step)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    state = _training_state_dict(bare, optimizer, is_loading=False)
    state.update(
        scheduler=scheduler.state_dict(),
        step=step,
        consumed_samples=consumed_samples,
        layout=_layout_record(),
    )
    dist_checkpointing.save(state, path)
    if dist.get_rank() == 0:
        write_record(path, arch, record, scales_from)
        with open(os.path.join(save_dir, LATEST_FILE), "w") as f:
            f.write(f"{step}\n")
    dist.barrier()
    return path


def latest_checkpoint(load_dir: str) -> str | None:
    """`load_dir`'s latest training checkpoint, or None when `load_dir` is not a training save directory."""
    latest = latest_iteration(load_dir)
    return None if latest is None else iteration_dir(load_dir, latest)


def _restore_adam_steps(optimizer) -> None:
    """torch.optim.Adam keeps a step count per parameter. Loading a distributed optimizer without apex/TE
    puts the checkpoint's count in each param group's "step" but leaves the per-parameter counts at the
    placeholder's (or makes them one shared tensor, which Adam would then advance once per parameter):
    give every parameter its own copy of its group's count."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(inner, "_init_optimizer_states_with_dummy_values"):
            continue  # not a DistributedOptimizer: its per-parameter state loads as saved
        for group in inner.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if "step" in inner.optimizer.state[param]:
                    inner.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


def load_checkpoint(path: str, bare, optimizer, scheduler) -> dict:
    """Restore a training checkpoint in place; returns its common state (step, consumed_samples, layout).

    The RNG states come back only at the layout they were saved at (they are per rank)."""
    common = dist_checkpointing.load_common_state_dict(path)
    # Adam creates its state on the first step; the loader fills existing tensors in place.
    # (Megatron-Core's other optimizers create their state in sharded_state_dict(is_loading=True).)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
    state = _training_state_dict(bare, optimizer, is_loading=True)
    if common["layout"] != _layout_record():
        state.pop("rng_state")
    loaded = dist_checkpointing.load(state, path)
    bare.load_state_dict(loaded["model"])
    with torch.no_grad():  # in fp32 the main parameters are views of the (grad-requiring) model's
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(common["scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return common
