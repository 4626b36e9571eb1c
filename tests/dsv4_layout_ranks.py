"""Rank functions for tests/test_model_layouts.py: DeepSeekV4Model trained at a parallel layout.

`train(layout, full)` builds the model chunks this rank holds, loads its slice of
the full (one-rank) tensors, then does what real training does: Megatron-Core's
schedule, DDP, `finalize_model_grads` (which also updates the routers' expert
bias) and the Megatron optimizer (Adam, fp32) for three steps. It returns, as full
tensors keyed by the one-rank names, the logits of `forward_logits`, the first
step's gradients, and the weights and routing buffers after the third step, plus
each step's main, MTP and indexer losses. With `full=None` (the one-rank reference) it
first draws random weights and returns them too. With `packed=True` every sequence is a packed row of
documents (`PACKED_ROWS`, megatron_v4.packing) whose boundaries straddle the CP chunk boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

import megatron_v4
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.context_parallel import local_chunk
from megatron_v4.indexer_loss import IndexerLossTracker
from megatron_v4.model import DeepSeekV4Model, pipeline_micro_batch_size
from megatron_v4.packing import document_loss_mask, packed_seq_params
from megatron_v4.specs import get_dsv4_attention_spec, get_dsv4_decoder_block_spec, get_dsv4_mtp_block_spec
from layout_slicing import dsv4_global_name, shard, unshard

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 64, 132, 4, 3
COMPRESS_RATIOS = [4, 128, 0, 4]  # CSA, HCA, sliding, CSA
NUM_HASH_LAYERS = 3  # layer 2 is hash-routed and sits on the second stage at pp=2
NUM_EXPERTS = 4
# cu_seqlens of global row i when packed. CP chunks end at 33, 66 and 99 (cp=4) or 66 (cp=2); documents
# and their CSA windows straddle those ends (30-41, 41-70, 64-67, 70-100, 37-132), the 130-token document
# has an HCA entry, and a 1-token document has no next token to predict at all.
PACKED_ROWS = [
    [0, 130, 132],
    [0, 1, 30, 41, 70, 100, 132],
    [0, 64, 67, 132],
    [0, 9, 37, 132],
]


def tiny_config(layout: megatron_v4.ParallelLayout, **overrides) -> DeepSeekV4TransformerConfig:
    """Every layer type (sliding, CSA, HCA), hash layers, 4 experts, one MTP layer."""
    fields = dict(
        num_layers=len(COMPRESS_RATIOS),
        hidden_size=32,
        num_attention_heads=4,
        kv_channels=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        o_groups=2,
        o_lora_rank=8,
        sliding_window=8,
        compress_ratios=COMPRESS_RATIOS,
        index_n_heads=16,
        index_head_dim=8,
        index_topk=4,
        yarn_factor=4.0,
        yarn_original_max_position_embeddings=64,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        num_hash_layers=NUM_HASH_LAYERS,
        vocab_size=VOCAB,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=16,
        moe_router_topk_scaling_factor=1.5,
        moe_router_bias_update_rate=1e-2,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.3,
        layernorm_epsilon=1e-6,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        **layout.config_kwargs(),
    )
    return DeepSeekV4TransformerConfig(**{**fields, **overrides})


def build_chunks(config: DeepSeekV4TransformerConfig) -> list[DeepSeekV4Model]:
    """This rank's model chunks (one per virtual pipeline stage)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    return [
        DeepSeekV4Model(
            config,
            decoder_spec=get_dsv4_decoder_block_spec(config, use_te=False),
            mtp_spec=get_dsv4_mtp_block_spec(config, use_te=False),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        for stage in stages
    ]


def _state(chunks) -> dict[str, tuple[DeepSeekV4Model, str, torch.Tensor]]:
    """Parameters and persistent buffers of all chunks, by one-rank name."""
    out = {}
    for chunk in chunks:
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            if not name.endswith("_extra_state"):
                out[dsv4_global_name(name, chunk)] = (name, tensor)
    return out


def gather(chunks, value=lambda tensor: tensor, only_params: bool = False) -> dict[str, torch.Tensor]:
    params = {id(p) for chunk in chunks for p in chunk.parameters()}
    return {
        global_name: unshard(name, tensor, value(tensor).detach()).clone()
        for global_name, (name, tensor) in _state(chunks).items()
        if not only_params or id(tensor) in params
    }


@torch.no_grad()
def randomise(chunks, generator: torch.Generator) -> None:
    """Weights of sensible scale everywhere (the default init leaves sinks, ape, hc bases and
    expert biases at zero), and a random hash table of distinct experts per token."""
    for name, (_, tensor) in sorted(_state(chunks).items()):
        if name.endswith("tid2eid"):
            table = torch.rand(tensor.shape[0], NUM_EXPERTS, generator=generator).argsort(dim=-1)
            tensor.copy_(table[:, : tensor.shape[1]])
        elif name.endswith("norm.weight"):
            tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
        elif tensor.dim() >= 2:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[-1] ** 0.5)
        else:
            tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))


def _load(chunks, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for global_name, (name, tensor) in _state(chunks).items():
            tensor.copy_(shard(name, tensor, full[global_name]))


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _forward_step(data_iterator, model):
    """One micro-batch of whole sequences (or one packed row and its cu_seqlens); under context
    parallelism this rank runs its chunk, and its loss is its share of the sequence's mean (the schedule
    and DDP then sum the shares)."""
    input_ids, cu_seqlens = next(data_iterator)
    if cu_seqlens is None:
        loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
        loss_mask[:, -1] = 0  # the last position has no next token
        packed = None
    else:  # nor has any document's last token
        loss_mask, packed = document_loss_mask(cu_seqlens).unsqueeze(0), packed_seq_params(cu_seqlens)
    labels = torch.roll(input_ids, -1, dims=1)
    num_tokens = loss_mask.sum()
    cp_group = parallel_state.get_context_parallel_group()
    input_ids, labels, loss_mask = (local_chunk(t, 1, cp_group) for t in (input_ids, labels, loss_mask))

    def loss(per_token):
        share = (per_token * loss_mask).sum() / num_tokens
        return share, {"loss": share.detach().clone()}

    return model(input_ids, labels=labels, loss_mask=loss_mask, packed_seq_params=packed), loss


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value / parallel_state.get_data_parallel_world_size()


def train(
    layout_kwargs: dict,
    full: dict | None,
    config_overrides: dict | None = None,
    train_steps: bool = True,
    packed: bool = False,
) -> dict:
    layout = megatron_v4.initialize(**layout_kwargs)
    try:
        config = tiny_config(layout, **(config_overrides or {}))
        chunks = build_chunks(config)
        result = {}
        if full is None:
            randomise(chunks, torch.Generator().manual_seed(0))
            result["initial"] = gather(chunks)
        else:
            _load(chunks, full)
        result["stage_layers"] = [[layer.layer_number for layer in c.decoder.layers] for c in chunks]

        for chunk in chunks:
            chunk.eval()
        dp_rank, dp = parallel_state.get_data_parallel_rank(), layout.dp
        share = GLOBAL_BATCH // dp
        rows = range(dp_rank * share, (dp_rank + 1) * share)
        mine = global_batch(0)[rows.start : rows.stop]
        if packed:
            result["logits"] = torch.cat(
                [
                    megatron_v4.forward_logits(chunks, mine[i : i + 1], cu_seqlens=PACKED_ROWS[row])
                    for i, row in enumerate(rows)
                ]
            )
        else:
            result["logits"] = megatron_v4.forward_logits(chunks, mine)
        result["logits_rows"] = (dp_rank * share, (dp_rank + 1) * share)
        if not train_steps:
            return result

        ddp_chunks = [
            DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)
            for chunk in chunks
        ]
        config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            # No clipping: Megatron-Core's clip asserts CUDA tensors; the grad norm is still computed.
            # adam_eps above the gradients' fp32 noise floor: some gradient entries are ~1e-8
            # (layer 0's hyper-connection, whose n streams are still identical) and carry
            # reduction-order noise of a few 1e-9, which Adam's g / (|g| + eps) with the default
            # eps=1e-8 turns into 1e-3 differences of the update (1e-4 of the weight).
            OptimizerConfig(
                optimizer="adam", lr=1e-2, adam_eps=1e-4, params_dtype=torch.float32, clip_grad=0.0
            ),
            ddp_chunks,
        )
        for chunk in ddp_chunks:
            chunk.train()
        result["losses"], result["mtp_losses"], result["indexer_losses"], result["grad_norms"] = [], [], [], []
        for step in range(STEPS):
            for chunk in ddp_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            MTPLossLoggingHelper.clean_metrics_in_tracker()
            num_microbatches = share  # one sequence per micro-batch
            batch = global_batch(step)[dp_rank * share : (dp_rank + 1) * share]
            cu_seqlens = [torch.tensor(PACKED_ROWS[row]) if packed else None for row in rows]
            micro_batches = list(zip(batch.split(1), cu_seqlens))
            iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iterators,
                model=ddp_chunks,
                num_microbatches=num_microbatches,
                seq_length=SEQ,
                micro_batch_size=pipeline_micro_batch_size(config, 1),
                forward_only=False,
            )
            if step == 0:
                result["grads"] = gather(chunks, lambda p: p.main_grad, only_params=True)
                result["bias_after_first_step"] = {
                    name: value for name, value in gather(chunks).items() if name.endswith("expert_bias")
                }
            _, grad_norm, _ = optimizer.step()
            result["grad_norms"].append(grad_norm)
            result["indexer_losses"].append(IndexerLossTracker.step_mean(num_microbatches).item())
            IndexerLossTracker.reset()
            if parallel_state.is_pipeline_last_stage():
                loss = torch.stack([x["loss"] for x in losses]).mean()
                dist.all_reduce(loss, group=parallel_state.get_context_parallel_group())
                loss = _dp_mean(loss)
                mtp = _dp_mean(MTPLossLoggingHelper.tracker["loss_values"][0] / num_microbatches)
                result["losses"].append(loss.item())
                result["mtp_losses"].append(mtp.item())
        result["final"] = gather(chunks)
        return result
    finally:
        megatron_v4.destroy()


def train_runs(runs: list[tuple[dict, dict]], full: dict | None = None) -> list[dict]:
    """`train` for each (layout kwargs, config overrides) in turn, in one group of ranks; with
    `full=None` the first run draws the weights and the later ones load them."""
    # One process group for all runs (`initialize` then leaves it up): a second rendezvous on the
    # harness's port would hang.
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    results = []
    for layout_kwargs, overrides in runs:
        results.append(train(layout_kwargs, full, overrides))
        full = full or results[-1]["initial"]
    return results


def train_plain_and_packed(layout_kwargs: dict, full: dict | None, config_overrides: dict | None = None) -> list[dict]:
    """`train` on whole sequences, then on the same tokens as packed rows, in one group of ranks."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    plain = train(layout_kwargs, full, config_overrides)
    return [plain, train(layout_kwargs, full or plain["initial"], config_overrides, packed=True)]


def save_checkpoint(layout_kwargs: dict, full: dict, directory: str) -> None:
    """Megatron-Core distributed checkpoint of the full weights, written from a layout."""
    layout = megatron_v4.initialize(**layout_kwargs)
    try:
        (model,) = build_chunks(tiny_config(layout))
        _load([model], full)
        dist_checkpointing.save(model.sharded_state_dict(), directory)
    finally:
        megatron_v4.destroy()


def load_checkpoint(layout_kwargs: dict, directory: str) -> dict:
    layout = megatron_v4.initialize(**layout_kwargs)
    try:
        (model,) = build_chunks(tiny_config(layout))
        with torch.no_grad():
            for _, tensor in _state([model]).values():
                tensor.zero_()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
        return gather([model])
    finally:
        megatron_v4.destroy()


def csa_layer_saved_bytes(cp: int, length: int, overrides: dict) -> int:
    """Bytes autograd keeps (parameters aside, each storage once) for one CSA attention layer's training
    forward on this rank's chunk of a `length`-token sequence at context parallelism `cp`."""
    torch.manual_seed(0)
    layout = megatron_v4.initialize(cp=cp)
    try:
        config = tiny_config(layout, num_layers=1, compress_ratios=[4], num_hash_layers=0, **overrides)
        layer = build_module(get_dsv4_attention_spec(use_te=False), config=config, layer_number=1)
        parameters = {parameter.untyped_storage().data_ptr() for parameter in layer.parameters()}
        # Cloned: the chunk of a contiguous tensor is a view that would count the whole sequence's storage.
        hidden = local_chunk(torch.randn(length, 1, config.hidden_size), 0, layer.cp_group).clone().requires_grad_()
        saved = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            layer(hidden)
        return sum(saved.values())
    finally:
        megatron_v4.destroy()
