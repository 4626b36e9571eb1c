"""`AutoBridge`: Hugging Face DeepSeek-V4 checkpoints <-> `megatron_v4.model.DeepSeekV4Model`.

    megatron_v4.initialize(tp=2, pp=2, ep=2)                        # any layout (or none: one rank)
    bridge = AutoBridge.from_hf_pretrained("path/to/checkpoint")   # any of the three namings, FP8/FP4 too
    model = bridge.to_megatron_model(dtype=torch.bfloat16)          # this rank's list of model chunks
    for name, tensor in bridge.export_hf_weights(model): ...        # full official tensors, on every rank
    bridge.load_hf_weights(model, tensors)                          # in place, from any (name, tensor) iterable
    bridge.save_hf_pretrained(model, "out/")                        # official safetensors + config.json

Loading, each rank asks the conversion plan (`bridge.conversion_plan`) which
official tensors make each tensor it holds and which share of them it holds
(`bridge.rank_tensors`), and reads only those shares. Exporting gathers the
shares, experts and pipeline stages back one tensor at a time (`bridge.gather`),
then the plan splits them into official tensors, renamed to the asked naming.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge import pipeline, weight_sync
from bridge.conversion_plan import ConversionPlan, RankPosition
from bridge.gather import ALL, RANK0, gather_full_tensors
from bridge.hf_config import read_hf_config, transformer_config, write_official_config
from bridge.hf_naming import OFFICIAL
from bridge.hf_source import HFSource, InMemorySource, carried_mtp_layers
from bridge.mcore_naming import detect_expert_form
from bridge.rank_tensors import model_chunks, rank_tensors
from bridge.safetensors_io import write_safetensors
from megatron_v4.model import DeepSeekV4Model

logger = logging.getLogger(__name__)

READ_THREADS = 4
"""Threads reading a checkpoint into a model: enough to keep the disk busy while others convert."""


def _plan_of(chunks) -> ConversionPlan:
    return ConversionPlan(detect_expert_form(chunks[0].state_dict()))


class AutoBridge:
    """One DeepSeek-V4 Hugging Face checkpoint (or model) and how to build and fill its Megatron-Core twin."""

    def __init__(self, source: HFSource | InMemorySource):
        self.source = source
        self.config = source.config
        self.naming = source.naming
        """Which Hugging Face naming the weights use: official, transformers-saved or transformers-module."""
        self.mtp_num_layers = carried_mtp_layers(source.config, source.names())
        """MTP layers the Megatron model gets: the config's, if the checkpoint carries their weights."""

    def __repr__(self) -> str:
        c = self.config
        return (
            f"AutoBridge(naming={self.naming!r}, config_flavour={c.flavour!r}, layers={c.num_layers}, "
            f"hidden={c.hidden_size}, experts={c.num_routed_experts}, mtp_layers={self.mtp_num_layers})"
        )

    @classmethod
    def from_hf_pretrained(cls, source) -> AutoBridge:
        """From a checkpoint directory of any naming, or an in-memory `DeepseekV4ForCausalLM`."""
        if isinstance(source, torch.nn.Module):
            weights = InMemorySource(source.state_dict(), read_hf_config(source.config.to_diff_dict()))
        else:
            weights = HFSource(source)
        bridge = cls(weights)
        logger.info("DeepSeek-V4 weights found: %r", bridge)
        return bridge

    # --- Megatron-Core side ------------------------------------------------------------------------
    def transformer_config(self, dtype: torch.dtype = torch.bfloat16, **overrides):
        """The `DeepSeekV4TransformerConfig` of this checkpoint for the current parallel layout."""
        return transformer_config(self.config, dtype, mtp_num_layers=self.mtp_num_layers, **overrides)

    def to_megatron_model(self, dtype: torch.dtype = torch.bfloat16, load_weights: bool = True, **config_overrides):
        """Build this rank's `DeepSeekV4Model` chunk(s) for the current layout and load their weights.

        Call `megatron_v4.initialize()` first. Returns the list of model chunks, as Megatron-Core's
        `get_model` does: one per virtual pipeline stage (one without virtual stages). With
        `load_weights`, the random initialisation the weights would overwrite is skipped.
        """
        if load_weights:
            config_overrides.setdefault("perform_initialization", False)
        config = self.transformer_config(dtype=dtype, **config_overrides)
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        chunks = [
            DeepSeekV4Model(
                config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                max_sequence_length=self.config.max_position_embeddings,
            )
            for vp_stage in (range(vpp) if vpp else [None])
        ]
        if torch.cuda.is_available():
            for chunk in chunks:
                chunk.cuda(torch.cuda.current_device())
        if load_weights:
            self.load_hf_weights(chunks)
        return chunks

    def load_hf_weights(self, model, tensors=None, strict: bool = True) -> None:
        """Fill this rank's model chunk(s) in place: from the checkpoint, or from `tensors`.

        Without `tensors`, each rank reads only the tensors and shares it holds, in
        `READ_THREADS` threads. `tensors` is any iterable of (name, tensor) (a dict, a
        generator, the buckets `export_hf_weights` yields) in any Hugging Face naming, each
        name told on its own, bf16/fp32 or FP8/FP4 with `.scale` companions. Call it on every
        rank with the same tensors (a tensor's full value, not a shard): each rank copies in
        its own share, skipping what other ranks hold. The model keeps its tensor objects,
        so optimizer state and gradient buffers stay attached. A name that is not a tensor
        of this model, or a wrong shape, is an error; so is a tensor this rank holds that is
        not given, unless `strict=False` (to update some tensors only).
        """
        chunks = model_chunks(model)
        plan = _plan_of(chunks)
        num_experts = self.config.num_routed_experts
        if tensors is not None:
            weight_sync.load_in_place(chunks, plan, num_experts, tensors, set(self.source.names()), strict)
            return
        ranks = RankPosition.current()
        held = [held for chunk in chunks for held in rank_tensors(chunk, plan, num_experts, ranks)]

        def fill(held) -> None:
            entry, target = held
            with torch.no_grad():  # per thread: grad mode is thread-local
                entry.plan.assemble(self.source.read_share, entry.slice, out=target)

        # reading (system calls) and converting (torch kernels) release the GIL: threads overlap them
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for _ in pool.map(fill, held):
                pass

    # --- Hugging Face side -------------------------------------------------------------------------
    def export_hf_weights(
        self,
        model,
        naming: str = OFFICIAL,
        *,
        dtype: str | None = None,
        bucket_bytes: int | None = None,
        ranks: str = ALL,
        cpu: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]] | Iterator[list[tuple[str, torch.Tensor]]]:
        """Every Hugging Face tensor of the model as (name, full tensor), from any parallel layout.

        `model` is this rank's chunk list (or one chunk). `naming`: official names by
        default, or a transformers naming. `dtype`: None gives the tensors as the model
        holds them; "bf16" and "source" are `export_checkpoint`'s (FP8/FP4 tensors as
        bf16, or re-quantised to the source checkpoint's formats, each followed by its
        `.scale`; official naming only). `bucket_bytes` groups the tensors into lists of
        at most that many bytes (one tensor per item if None). `ranks` says where the
        tensors appear: "all" (every rank), "rank0", or "owner" (each tensor on one rank
        only: its pipeline stage's and expert rank's first tensor-parallel rank). Every
        rank must call it and iterate to the end: tensors are gathered by collectives,
        one at a time (see `bridge.gather`). `cpu=False` leaves them where they were
        gathered. A tensor may be the model's own (not a copy): copy what you keep.
        """
        if dtype == "source" and naming != OFFICIAL:
            raise ValueError(
                f"dtype='source' gives the released checkpoints' FP8/FP4 tensors, which have official names; "
                f"use naming={OFFICIAL!r} or dtype='bf16' for the {naming!r} naming"
            )
        chunks = model_chunks(model)
        plan = _plan_of(chunks)
        items = gather_full_tensors(chunks, plan, self.config.num_routed_experts, receivers=ranks)
        items = plan.split(items)
        if dtype is not None:
            items = weight_sync.in_export_dtype(items, dtype, self.source)
        if naming != OFFICIAL:
            items = pipeline.from_official(items, naming, self.config.num_routed_experts)
        if cpu:
            items = ((name, tensor.cpu()) for name, tensor in items)
        return items if bucket_bytes is None else weight_sync.buckets(items, bucket_bytes)

    def save_hf_pretrained(self, model, out_dir: str | os.PathLike, max_shard_bytes: int | None = None) -> str:
        """Write the model, from any parallel layout, as an official checkpoint: safetensors with official
        names and an official-flavour config.json. Call it on every rank: rank 0 receives the tensors one by
        one and writes."""
        chunks = model_chunks(model)
        items = self.export_hf_weights(chunks, ranks=RANK0)
        if dist.is_initialized() and dist.get_rank() != 0:
            for _ in items:
                pass
        else:
            write_safetensors(items, out_dir, max_shard_bytes=max_shard_bytes)
            config = chunks[0].config
            dtype = str(config.params_dtype).removeprefix("torch.")
            mtp_layers = config.mtp_num_layers or 0
            write_official_config(
                dataclasses.replace(self.config, num_nextn_predict_layers=mtp_layers, dtype=dtype), out_dir
            )
        if dist.is_initialized():
            dist.barrier()  # the checkpoint is complete when any rank returns
        return os.fspath(out_dir)
