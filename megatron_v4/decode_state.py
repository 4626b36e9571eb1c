"""Incremental decode state of DeepSeek-V4 attention.

What the official inference code keeps between decode steps (its attention's
`kv_cache` and its compressors' `kv_state`/`score_state`).

What a layer must remember so that a new token costs O(window + selected
entries) instead of a re-run of the prefix:

- the sliding window: the last `window` kv vectors (one shared head), a ring
  indexed by position % window;
- the compressed entries emitted so far (CSA and HCA layers);
- the compressor's unfinished window: kv and gate (gate + ape) of up to m
  tokens, in float32 as the compressor pools them; for CSA (m = 4, overlapping
  windows) also the A halves of the last complete window, which the next
  entry pools;
- CSA layers: the lightning indexer's own compressor state and its keys.

The KV head and the compressors are replicated over tensor parallelism, so
every tensor-parallel rank holds the same state; the per-rank query heads and
indexer heads need none.

`megatron_v4.inference.DeepSeekV4InferenceContext` carries these states
through the model the way Megatron-Core's `StaticInferenceContext` carries its
KV cache: the model's forward takes it as `inference_context`, and each
attention module asks it for its own state (`attention_state` /
`set_attention_state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressorDecodeState:
    """One compressor's running state for `batch` sequences.

    values / gates: [m, batch, coff * width] float32, the slots of the unfinished window
        (slot = position % m; gates include ape).
    previous_values / previous_gates: [m, batch, width] float32, CSA only: the A halves of
        the last complete window (zeros and -inf before the first one: weight 0).
    entries: [capacity, batch, width], the first `num_entries` are the emitted entries.
    """

    values: torch.Tensor
    gates: torch.Tensor
    previous_values: torch.Tensor | None
    previous_gates: torch.Tensor | None
    entries: torch.Tensor
    num_entries: int = 0

    def append_entries(self, entries: torch.Tensor) -> None:
        """entries: [n, batch, width]."""
        end = self.num_entries + entries.shape[0]
        if end > self.entries.shape[0]:
            raise ValueError(
                f"the decode state has room for {self.entries.shape[0]} compressed entries, {end} are needed; "
                "create the inference context with a larger max_sequence_length"
            )
        self.entries[self.num_entries : end] = entries.detach()
        self.num_entries = end

    @property
    def emitted(self) -> torch.Tensor:
        """[num_entries, batch, width]."""
        return self.entries[: self.num_entries]


@dataclass
class AttentionDecodeState:
    """One attention layer's state: the window ring, and its compressors' states where it has them.

    window_kv: [window, batch, head_dim], slot = position % window.
    length: tokens seen so far (the next token's position).
    """

    window_kv: torch.Tensor
    compressor: CompressorDecodeState | None
    indexer_compressor: CompressorDecodeState | None
    length: int = 0

    def push_kv(self, key_values: torch.Tensor, first_position: int) -> None:
        """key_values: [n <= window, batch, head_dim] of the tokens from `first_position` on."""
        window = self.window_kv.shape[0]
        slots = torch.arange(first_position, first_position + key_values.shape[0], device=key_values.device)
        self.window_kv[slots % window] = key_values

    @property
    def window_keys(self) -> torch.Tensor:
        """The (up to `window`) kv vectors the latest token sees, [n, batch, head_dim], in ring order."""
        return self.window_kv[: min(self.length, self.window_kv.shape[0])]
