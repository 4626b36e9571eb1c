"""`DeepSeekV4InferenceContext`: the decode cache of a DeepSeek-V4 model.

A Megatron-Core `StaticInferenceContext` whose `key_value_memory_dict` holds one
`megatron_v4.decode_state.AttentionDecodeState` per attention module (the
sliding-window ring, the compressed entries, the compressors' unfinished
windows and the indexer's keys). A forward over a fresh context from position 0
is an ordinary forward that also fills the states (prefill); later forwards take
the next tokens and read/extend them. The caller moves the context on with
`increment_sequence_len_offset(num_tokens)` after each forward; the model reads
`sequence_len_offset` as the position of the first token it is given.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts.static_context import StaticInferenceContext

from megatron_v4.decode_state import AttentionDecodeState


class DeepSeekV4InferenceContext(StaticInferenceContext):
    """Megatron-Core static inference context holding DeepSeek-V4's decode states.

    `key_value_memory_dict` maps each attention module to its `AttentionDecodeState`
    (keyed by module so that decoder and MTP layers, which share layer numbers, never
    collide). The batch is static: every sequence has the same length, no padding.
    Built as `DeepSeekV4InferenceContext(max_batch_size, max_sequence_length)`; the compressed-entry
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
