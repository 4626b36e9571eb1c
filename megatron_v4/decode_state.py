"""Incremental decode state of DeepSeek-V4 attention (spec section 3, "Decode state").

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

`DSv4InferenceContext` carries these states through the model the way
Megatron-Core's `StaticInferenceContext` carries its KV cache: the model's
forward takes it as `inference_context`. A forward over a fresh context from
position 0 is an ordinary forward that also fills the states (prefill); later
forwards take the next tokens and read/extend the states. The caller moves the
context on with `increment_sequence_len_offset(num_tokens)` after each forward;
the model reads `sequence_len_offset` as the position of the first token it is
given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.inference.contexts.static_context import StaticInferenceContext


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
                "create the DSv4InferenceContext with a larger max_sequence_length"
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


class DSv4InferenceContext(StaticInferenceContext):
    """Megatron-Core static inference context holding DeepSeek-V4's decode states.

    `key_value_memory_dict` maps each attention module to its `AttentionDecodeState`
    (keyed by module so that decoder and MTP layers, which share layer numbers, never
    collide). The batch is static: every sequence has the same length, no padding.
    Built as `DSv4InferenceContext(max_batch_size, max_sequence_length)`; the compressed-entry
    buffers are sized for `max_sequence_length` tokens.
    """

    def is_static_batching(self) -> bool:
        return True

    def attention_state(self, attention: torch.nn.Module) -> AttentionDecodeState | None:
        return self.key_value_memory_dict.get(attention)

    def set_attention_state(self, attention: torch.nn.Module, state: AttentionDecodeState) -> None:
        self.key_value_memory_dict[attention] = state

    def reset(self) -> None:
        """Forget every sequence: the next forward is a prefill again."""
        super().reset()
        self.key_value_memory_dict.clear()
