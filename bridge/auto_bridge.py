"""`AutoBridge`: Hugging Face DeepSeek-V4 checkpoints <-> `megatron_v4.model.DeepSeekV4Model`.

    megatron_v4.initialize(tp=2, pp=2, ep=2)                        # any layout (or none: one rank)
    bridge = AutoBridge.from_hf_pretrained("path/to/checkpoint")   # any of the three namings, FP8/FP4 too
    model = bridge.to_megatron_model(dtype=torch.bfloat16)          # this rank's list of model chunks
    for name, tensor in bridge.export_hf_weights(model): ...        # full official tensors, on every rank
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

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge import pipeline
from bridge.conversion_plan import ConversionPlan, RankPosition
from bridge.gather import gather_full_tensors
from bridge.hf_config import read_hf_config, transformer_config, write_official_config
from bridge.hf_naming import OFFICIAL
from bridge.hf_source import HFSource, InMemorySource, carried_mtp_layers
from bridge.mcore_naming import detect_expert_form
from bridge.rank_tensors import model_chunks, rank_tensors
from bridge.safetensors_io import write_safetensors
from megatron_v4.model import DeepSeekV4Model

logger = logging.getLogger(__name__)


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
        `get_model` does: one per virtual pipeline stage (one without virtual stages).
        """
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

    def load_hf_weights(self, model) -> None:
        """Fill this rank's model chunk(s) from the checkpoint, reading only the tensors and shares they hold."""
        chunks = model_chunks(model)
        plan = _plan_of(chunks)
        ranks = RankPosition.current()
        with torch.no_grad():
            for chunk in chunks:
                for entry, target in rank_tensors(chunk, plan, self.config.num_routed_experts, ranks):
                    value = entry.plan.assemble(self.source.read_share, entry.slice)
                    if tuple(value.shape) != tuple(target.shape):
                        raise ValueError(
                            f"{entry.local_name} (checkpoint {entry.plan.official}): the checkpoint gives "
                            f"shape {tuple(value.shape)} but the model has {tuple(target.shape)}; "
                            "does the config match the checkpoint?"
                        )
                    target.copy_(value)

    # --- Hugging Face side -------------------------------------------------------------------------
    def export_hf_weights(
        self, model, naming: str = OFFICIAL, all_ranks: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor on the CPU) of every Hugging Face tensor of the model, from any parallel layout.

        Official names by default. `model` is this rank's chunk list (or one chunk). With
        `all_ranks` every rank receives every tensor; with `all_ranks=False` only rank 0 does
        and the others yield nothing. Every rank must iterate the stream to its end: each
        tensor is gathered by collectives (see `bridge.gather`).
        """
        chunks = model_chunks(model)
        plan = _plan_of(chunks)
        items = gather_full_tensors(chunks, plan, self.config.num_routed_experts, all_ranks=all_ranks)
        items = plan.split(items)
        if naming != OFFICIAL:
            items = pipeline.from_official(items, naming, self.config.num_routed_experts)
        return items

    def save_hf_pretrained(self, model, out_dir: str | os.PathLike, max_shard_bytes: int | None = None) -> str:
        """Write the model, from any parallel layout, as an official checkpoint: safetensors with official
        names and an official-flavour config.json. Call it on every rank: rank 0 receives the tensors one by
        one and writes."""
        chunks = model_chunks(model)
        items = self.export_hf_weights(chunks, all_ranks=False)
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
