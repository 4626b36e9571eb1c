"""`AutoBridge`: Hugging Face DeepSeek-V4 checkpoints <-> `megatron_v4.model.DeepSeekV4Model`.

    megatron_v4.initialize(tp=2, pp=2, ep=2)                        # any layout (or none: one rank)
    bridge = AutoBridge.from_hf_pretrained("path/to/checkpoint")   # any of the three namings, FP8/FP4 too
    model = bridge.to_megatron_model(dtype=torch.bfloat16)          # this rank's list of model chunks
    for name, tensor in bridge.export_hf_weights(model): ...        # full official tensors, on every rank
    bridge.save_hf_pretrained(model, "out/")                        # official safetensors + config.json

Loading, each rank reads from the checkpoint only the tensors its chunks hold
and only its slice of each (`bridge.rank_tensors`, `bridge.checkpoint_slices`).
Exporting gathers the slices, experts and pipeline stages back one tensor at a
time (`bridge.gather`), then `bridge.pipeline` splits and renames them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from bridge import pipeline
from bridge.checkpoint_slices import checkpoint_slices
from bridge.gather import gather_full_tensors
from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config, transformer_config_kwargs, write_official_config
from bridge.hf_naming import OFFICIAL, detect_naming
from bridge.hf_source import HFSource
from bridge.mcore_naming import MCoreNaming, detect_expert_layout
from bridge.pipeline import RankPosition
from bridge.rank_tensors import RankTensor, model_chunks, rank_tensors
from bridge.safetensors_io import write_safetensors

MTP_PREFIX = "mtp."
logger = logging.getLogger(__name__)


class StateDictWeights:
    """The tensors of an in-memory model (e.g. a `DeepseekV4ForCausalLM`), in the source's weight API."""

    def __init__(self, module: torch.nn.Module):
        self._state = module.state_dict()

    def names(self) -> list[str]:
        return list(self._state)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._state.items())


class AutoBridge:
    """One DeepSeek-V4 Hugging Face checkpoint (or model) and how to build and fill its Megatron-Core twin."""

    def __init__(self, config: DeepSeekV4HFConfig, weights, naming: str):
        self.config = config
        self.weights = weights
        self.naming = naming
        """Which Hugging Face naming the weights use: official, transformers-saved or transformers-module."""
        self.has_mtp = any(name.startswith(MTP_PREFIX) for name in weights.names())

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
            config = read_hf_config(source.config.to_diff_dict())
            weights = StateDictWeights(source)
            naming = detect_naming(weights.names())
        else:
            weights = HFSource(source)
            config, naming = weights.config, weights.naming
        bridge = cls(config, weights, naming)
        logger.info("DeepSeek-V4 weights found: %r", bridge)
        return bridge

    # --- Megatron-Core side ------------------------------------------------------------------------
    @property
    def mtp_num_layers(self) -> int:
        """MTP layers the Megatron model gets: the config's, if the checkpoint carries their weights."""
        return self.config.num_nextn_predict_layers if self.has_mtp else 0

    def transformer_config(self, dtype: torch.dtype = torch.bfloat16, **overrides):
        """The `DeepSeekV4TransformerConfig` of this checkpoint for the current parallel layout."""
        import megatron_v4
        from megatron_v4.config import DeepSeekV4TransformerConfig

        kwargs = transformer_config_kwargs(self.config, mtp_num_layers=self.mtp_num_layers)
        kwargs.update(megatron_v4.layout().config_kwargs())
        kwargs.update(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        kwargs.update(overrides)
        return DeepSeekV4TransformerConfig(**kwargs)

    def to_megatron_model(self, dtype: torch.dtype = torch.bfloat16, load_weights: bool = True, **config_overrides):
        """Build this rank's `DeepSeekV4Model` chunk(s) for the current layout and load their weights.

        Call `megatron_v4.initialize()` first. Returns the list of model chunks, as Megatron-Core's
        `get_model` does: one per virtual pipeline stage (one without virtual stages).
        """
        from megatron.core import parallel_state as ps

        from megatron_v4.model import DeepSeekV4Model

        config = self.transformer_config(dtype=dtype, **config_overrides)
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        chunks = [
            DeepSeekV4Model(
                config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
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
        """Fill this rank's model chunk(s) from the checkpoint, reading only the tensors and slices they hold."""
        chunks = model_chunks(model)
        mcore = MCoreNaming(detect_expert_layout(chunks[0].state_dict()))
        source = checkpoint_slices(self.weights, self.naming)
        ranks = RankPosition.current()
        with torch.no_grad():
            for chunk in chunks:
                for entry, target in rank_tensors(chunk, mcore, self.config.num_routed_experts, ranks):
                    value = _read_share(source, entry)
                    if tuple(value.shape) != tuple(target.shape):
                        raise ValueError(
                            f"{entry.local_name} (checkpoint {entry.match.official_names}): the checkpoint gives "
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
        mcore = MCoreNaming(detect_expert_layout(chunks[0].state_dict()))
        items = gather_full_tensors(chunks, mcore, self.config.num_routed_experts, all_ranks=all_ranks)
        items = pipeline.split(items, mcore)
        if naming != OFFICIAL:
            items = pipeline.from_official(items, naming, self.config.num_routed_experts)
        return items

    def save_hf_pretrained(self, model, out_dir: str | os.PathLike, max_shard_bytes: int | None = None) -> str:
        """Write the model, from any parallel layout, as an official-flavour checkpoint (safetensors +
        config.json). Call it on every rank: rank 0 receives the tensors one by one and writes."""
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


def _read_share(source, entry: RankTensor) -> torch.Tensor:
    """This rank's share of one Megatron-Core tensor, read from its official tensor(s).

    A fused tensor ([w1; w3]) is its parts' shares stacked on dim 0, which is what a
    glu split expects: [w1 part; w3 part].
    """
    officials = entry.match.official_names
    part = dataclasses.replace(entry.slice, glu=False)
    if len(officials) == 1:
        return source.read(officials[0], part)
    return torch.cat([source.read(official, part) for official in officials], dim=0)
