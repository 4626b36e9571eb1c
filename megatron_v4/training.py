"""Training pieces for DeepSeek-V4 on Megatron-Core, used by `examples/pretrain.py`.

- the model of an architecture (`bridge.DeepSeekV4HFConfig`) for the current
  parallel layout: this rank's pipeline stage, wrapped for mixed precision and
  in Megatron-Core's `DistributedDataParallel`;
- the data: Megatron-Core's `GPTDataset` over an indexed (.bin/.idx) dataset, a
  text/JSONL file tokenised into one, or `MockGPTDataset`; batches are drawn in
  a fixed order from a sample counter, so a resumed run sees the same data;
- one optimizer step through Megatron-Core's schedules (any pipeline size),
  with the losses reduced over the whole world;
- `torch_dist` checkpoints of model, optimizer, scheduler, RNG and data position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

import megatron_v4
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.model import DeepSeekV4Model

CONFIG_DIR = "dsv4_bridge"
"""Where a checkpoint keeps the official-flavour `config.json` of its architecture (as `bridge import` does)."""
LATEST_FILE = "latest_checkpointed_iteration.txt"
OPTIMIZER_SHARDING = "dp_reshardable"
"""How the distributed optimizer's state is saved: resumable at another data-parallel size, not at other
TP/PP/EP sizes (the model weights load at any layout). Megatron-Core's "fully_reshardable" format fails to
load torch.optim.Adam's per-parameter step (needs apex or Transformer Engine's FusedAdam)."""


# --- model ---------------------------------------------------------------------------------------------
def transformer_config(arch, dtype: torch.dtype, mtp_num_layers: int | None = None, **overrides):
    """`DeepSeekV4TransformerConfig` of architecture `arch` (a `bridge.DeepSeekV4HFConfig`) for this layout."""
    from bridge import transformer_config_kwargs

    kwargs = transformer_config_kwargs(arch, mtp_num_layers=mtp_num_layers)
    kwargs.update(megatron_v4.layout().config_kwargs())
    kwargs.update(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return DeepSeekV4TransformerConfig(**kwargs)


def build_optimizer(model, config):
    """Megatron-Core's optimizer (distributed if `config.use_distributed_optimizer`) for one model chunk."""
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(config, [model])


def build_model(config: DeepSeekV4TransformerConfig, use_distributed_optimizer: bool = True):
    """This rank's stage of `DeepSeekV4Model`, in bf16 if the config says so, inside Megatron-Core's DDP.

    Returns (ddp_model, bare_model): the bare model is what checkpoints and weight loading see.
    """
    bare = DeepSeekV4Model(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        bare.cuda(torch.cuda.current_device())
    module = Float16Module(config, bare) if config.bf16 else bare
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, module), bare


def load_model_weights(bare: DeepSeekV4Model, checkpoint_dir: str) -> None:
    """Model weights only, from a `torch_dist` checkpoint (`bridge import` or one of ours), at any layout."""
    sharded = bare.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": sharded}, checkpoint_dir)
    bare.load_state_dict(loaded["model"])


def read_architecture(checkpoint_dir: str):
    """The architecture a checkpoint records in `dsv4_bridge/config.json`."""
    from bridge import read_hf_config

    path = os.path.join(checkpoint_dir, CONFIG_DIR, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: --load needs a checkpoint written by `python -m bridge import` or by pretrain.py"
        )
    return read_hf_config(path)


def checkpoint_mtp_layers(checkpoint_dir: str) -> int | None:
    """MTP layers of the model a checkpoint holds (None: the architecture's own count)."""
    record = os.path.join(checkpoint_dir, CONFIG_DIR, "source.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f).get("mtp_num_layers")
    return None


# --- data ----------------------------------------------------------------------------------------------
class VocabTokenizer:
    """What Megatron's datasets need of a tokenizer for prepared or mock data: the vocabulary size, the
    end-of-document token (the last one here) and identifiers for their cache of sample indices."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


class ByteTokenizer(VocabTokenizer):
    """UTF-8 bytes as tokens 0..255 and an end-of-document token 256: needs nothing on disk."""

    def __init__(self):
        super().__init__(vocab_size=257)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer(VocabTokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json and friends); its eos token ends documents."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self.path = os.path.abspath(path)
        self.vocab_size = len(self._tokenizer)
        self.eod = self._tokenizer.eos_token_id
        if self.eod is None:
            raise ValueError(f"the tokenizer in {path} has no eos token; set eos_token in its tokenizer_config.json")

    @property
    def unique_identifiers(self) -> dict:
        return {**super().unique_identifiers, "path": self.path}

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _documents(path: str) -> Iterator[str]:
    """A JSONL file's "text" fields, or a plain text file's paragraphs (split on blank lines)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            for paragraph in f.read().split("\n\n"):
                if paragraph.strip():
                    yield paragraph


def tokenise_to_indexed(text_path: str, tokenizer, out_prefix: str) -> str:
    """Tokenise a text/JSONL file into a Megatron indexed dataset `out_prefix`.bin/.idx (rank 0 writes)."""
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
        dtype = numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32
        builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
        for text in _documents(text_path):
            ids = tokenizer.encode(text) + [tokenizer.eod]
            builder.add_document(ids, [len(ids)])
        builder.finalize(out_prefix + ".idx")
        if not builder.sequence_lengths or not sum(builder.sequence_lengths):
            raise ValueError(f"{text_path} holds no text (JSONL needs a 'text' field per line)")
    dist.barrier()
    return out_prefix


def build_dataset(
    kind: str,
    num_samples: int,
    seq_length: int,
    tokenizer,
    seed: int,
    data_prefix: str | None = None,
    cache_dir: str | None = None,
) -> GPTDataset:
    """A `GPTDataset` (kind "indexed" or "mock") of at least `num_samples` samples of seq_length + 1 tokens."""
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None) if kind == "indexed" else None,
        split="100,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
    )
    cls = MockGPTDataset if kind == "mock" else GPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(cls, [num_samples, 0, 0], lambda: True, config).build()
    return train


@dataclass
class DataOrder:
    """Which samples a rank reads: global batch `step` holds samples [step * global_batch, ...), split in
    micro batches, each split over the data-parallel ranks (as Megatron's pretraining sampler does)."""

    micro_batch_size: int
    num_microbatches: int
    dp_rank: int
    dp_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    def micro_batches(self, dataset, step: int) -> Iterator[dict[str, torch.Tensor]]:
        first = step * self.global_batch_size
        for m in range(self.num_microbatches):
            start = first + (m * self.dp_size + self.dp_rank) * self.micro_batch_size
            samples = [dataset[i] for i in range(start, start + self.micro_batch_size)]
            yield {
                key: torch.stack([torch.as_tensor(sample[key]) for sample in samples])
                for key in ("tokens", "labels", "loss_mask")
            }


# --- one step ------------------------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Token-summed loss and token count: the schedule divides by the count, the logs reduce both."""
    loss_mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


def _forward_step(data_iterator, model):
    batch = {k: v.to(_device()) for k, v in next(data_iterator).items()}
    per_token_loss = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
    return per_token_loss, lambda output: _loss_func(batch["loss_mask"], output)


def prepare_for_training(model: DistributedDataParallel, optimizer) -> None:
    """Hook the gradient finalisation (DP reduction, SP/embedding all-reduces, expert-bias update) and the
    loss scale into the model config, where Megatron-Core's schedules look for them."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync


def train_step(model, optimizer, scheduler, dataset, order: DataOrder, step: int, seq_length: int) -> dict:
    """Forward/backward over one global batch, optimizer and LR-scheduler step. Returns the step's metrics,
    identical on every rank: loss (token mean over the global batch), mtp_loss (None without MTP),
    grad_norm, lr, tokens."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=order.micro_batches(dataset, step),
        model=[model],
        num_microbatches=order.num_microbatches,
        seq_length=seq_length,
        # Between stages the hc_mult residual streams travel as [seq, batch * hc_mult, hidden].
        micro_batch_size=order.micro_batch_size * (model.config.hc_mult if pipelined else 1),
        forward_only=False,
    )
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)

    # Sums over the world: every tensor-parallel copy counts the same tokens, so the ratios are exact.
    totals = torch.zeros(4, dtype=torch.float64, device=_device())
    for out in outputs:
        totals[:2] += out["lm loss"].double()
    tracker = MTPLossLoggingHelper.tracker
    if parallel_state.is_pipeline_last_stage() and "loss_values" in tracker:
        totals[2] += tracker["loss_values"].sum().double() / order.num_microbatches
        totals[3] += 1
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    dist.all_reduce(totals)
    return {
        "loss": (totals[0] / totals[1]).item(),
        "mtp_loss": (totals[2] / totals[3]).item() if totals[3] else None,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": scheduler.get_lr(optimizer.param_groups[0]),
        "tokens": order.global_batch_size * seq_length,
    }


# --- checkpoints ---------------------------------------------------------------------------------------
def _rng_state() -> ShardedObject:
    """This rank's RNG states (one object per pp x tp x dp position; only reloaded at the same layout)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy.random.get_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
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
    layout = megatron_v4.layout()
    return {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp, "dp": layout.dp}


def _training_state_dict(bare, optimizer, is_loading: bool) -> dict:
    model = bare.sharded_state_dict()
    return {
        "model": model,
        "optimizer": optimizer.sharded_state_dict(
            model, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
        ),
        "rng_state": _rng_state(),
    }


def checkpoint_path(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"iter_{step:07d}")


def save_checkpoint(save_dir: str, step: int, bare, optimizer, scheduler, arch, consumed_samples: int) -> str:
    """Write `save_dir/iter_<step>` (torch_dist) and point `save_dir/latest_checkpointed_iteration.txt` at it."""
    from bridge.hf_config import write_official_config

    path = checkpoint_path(save_dir, step)
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
        write_official_config(arch, os.path.join(path, CONFIG_DIR))
        with open(os.path.join(save_dir, LATEST_FILE), "w") as f:
            f.write(f"{step}\n")
    dist.barrier()
    return path


def latest_checkpoint(load_dir: str) -> str | None:
    """`load_dir`'s latest training checkpoint, or None when `load_dir` is not a training save directory."""
    latest = os.path.join(load_dir, LATEST_FILE)
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return checkpoint_path(load_dir, int(f.read().strip()))


def _restore_adam_steps(optimizer) -> None:
    """torch.optim.Adam keeps a step count per parameter. Loading a distributed optimizer without apex/TE
    puts the checkpoint's count in each param group's "step" but leaves the per-parameter counts at the
    placeholder's (or makes them one shared tensor, which Adam would then advance once per parameter):
    give every parameter its own copy of its group's count."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
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
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state:
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
