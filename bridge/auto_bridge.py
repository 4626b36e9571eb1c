"""`AutoBridge`: Hugging Face DeepSeek-V4 checkpoints <-> `megatron_v4.model.DeepSeekV4Model`.

    bridge = AutoBridge.from_hf_pretrained("path/to/checkpoint")   # any of the three namings
    model = bridge.to_megatron_model(dtype=torch.bfloat16)          # list of model chunks
    for name, tensor in bridge.export_hf_weights(model): ...        # official names
    bridge.save_hf_pretrained(model, "out/")                        # official safetensors + config.json

The conversion itself is the step pipeline of `bridge.pipeline`; this class
wires a weight source, a config and the current parallel layout into it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import torch

from bridge import pipeline
from bridge.hf_config import DeepSeekV4HFConfig, read_hf_config, transformer_config_kwargs, write_official_config
from bridge.hf_naming import OFFICIAL, detect_naming
from bridge.mcore_naming import MCoreNaming, detect_expert_layout
from bridge.pipeline import RankPosition
from bridge.safetensors_io import SafetensorsCheckpoint, write_safetensors

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


def _drop_mtp(items: pipeline.Items) -> Iterator[tuple[str, torch.Tensor]]:
    """Leave out the MTP tensors (for a model built without MTP layers)."""
    return ((name, t) for name, t in items if not name.startswith(MTP_PREFIX))


def _single_chunk(model) -> torch.nn.Module:
    """The one model chunk of `model` (a module or a list of chunks), without DDP / Float16Module wrappers."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise NotImplementedError(
            f"got {len(chunks)} model chunks; the bridge handles one (pp=1, no virtual pipeline) for now"
        )
    chunk = chunks[0]
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


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
        else:
            config = read_hf_config(source)
            weights = SafetensorsCheckpoint(source)
        bridge = cls(config, weights, detect_naming(weights.names()))
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
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        kwargs.update(overrides)
        return DeepSeekV4TransformerConfig(**kwargs)

    def to_megatron_model(self, dtype: torch.dtype = torch.bfloat16, load_weights: bool = True, **config_overrides):
        """Build `DeepSeekV4Model` for the current layout (`megatron_v4.initialize()` first), load the weights.

        Returns the list of model chunks, as Megatron-Core's `get_model` does.
        """
        from megatron.core import parallel_state as ps

        from megatron_v4.model import DeepSeekV4Model

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("the bridge builds single-stage models for now; initialize with pp=1")
        config = self.transformer_config(dtype=dtype, **config_overrides)
        model = DeepSeekV4Model(config, pre_process=True, post_process=True)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks = [model]
        if load_weights:
            self.load_hf_weights(chunks)
        return chunks

    def load_hf_weights(self, model) -> None:
        """Copy this checkpoint's weights into Megatron model chunk(s), this rank's part of each."""
        chunk = _single_chunk(model)
        mcore = MCoreNaming(detect_expert_layout(chunk.state_dict()))
        items = pipeline.to_official(self.weights.items(), self.naming)
        items = pipeline.dequantise(items)
        if not getattr(chunk, "mtp_process", False):
            items = _drop_mtp(items)
        items = pipeline.fuse(items, mcore)
        items = pipeline.shard(items, mcore, self.config.num_routed_experts, RankPosition.current())
        pipeline.load_into(chunk, items)

    # --- Hugging Face side -------------------------------------------------------------------------
    def export_hf_weights(self, model, naming: str = OFFICIAL) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every Hugging Face tensor of the Megatron model, official names by default."""
        chunk = _single_chunk(model)
        mcore = MCoreNaming(detect_expert_layout(chunk.state_dict()))
        items = pipeline.read_module(chunk)
        items = pipeline.unshard(items, mcore, self.config.num_routed_experts, RankPosition.current())
        items = pipeline.split(items, mcore)
        if naming != OFFICIAL:
            items = pipeline.from_official(items, naming, self.config.num_routed_experts)
        return items

    def save_hf_pretrained(self, model, out_dir: str | os.PathLike, max_shard_bytes: int | None = None) -> str:
        """Write the Megatron model as an official-flavour checkpoint (safetensors + config.json)."""
        chunk = _single_chunk(model)
        write_safetensors(self.export_hf_weights(chunk), out_dir, max_shard_bytes=max_shard_bytes)
        mtp_layers = chunk.config.mtp_num_layers or 0
        dtype = str(chunk.config.params_dtype).removeprefix("torch.")
        write_official_config(
            dataclasses.replace(self.config, num_nextn_predict_layers=mtp_layers, dtype=dtype), out_dir
        )
        return os.fspath(out_dir)
