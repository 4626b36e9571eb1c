"""KV compressor of DeepSeek-V4's compressed attention layers (official inference code `Compressor`).

Every `compress_ratio` (m) tokens of a layer's input are pooled into one
compressed KV entry:

- a_t = linear_kv(x_t), z_t = linear_gate(x_t) + ape[t mod m]
  (ape: a learned absolute-position bias inside the window);
- entry w = sum over the window's token slots of softmax_slots(z) * a, the softmax
  taken over the slots separately for every channel;
- then RMSNorm and RoPE (compressed-layer frequencies) at position w * m.

HCA (m = 128) pools the m tokens of window w. CSA (m = 4) uses overlapping
windows: a and z are twice as wide, [A | B]; entry w pools 2m slots, the A
halves of window w-1 and the B halves of window w (window 0 has no A slots).

Only complete windows emit entries: a sequence of s tokens gives s // m
entries, and query t may see entry w only when w < (t + 1) // m (the caller
applies that rule). An entry pools the `span` = 2m (CSA) or m (HCA) tokens ending
at its window's last token, so a caller holding only later entries' tokens (a
context-parallel chunk, `first_entry` > 0) passes them from window first_entry - 1
(CSA) or first_entry (HCA) on.

The layer's attention owns one compressor of width head_dim; a CSA layer's
lightning indexer owns a second one of width index_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.post_training.modelopt.layers import Linear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_v4.config import CSA, HCA, DeepSeekV4TransformerConfig
from megatron_v4.decode_state import CompressorDecodeState
from megatron_v4.rope import DeepSeekV4RotaryEmbedding, apply_rotary


@dataclass
class DeepSeekV4CompressorSubmodules:
    """Replicated linears (not split over tensor parallelism) and the entry RMSNorm."""

    linear_kv: ModuleSpec | type = None
    linear_gate: ModuleSpec | type = None
    norm: ModuleSpec | type = None


class ReplicatedLinear(Linear):
    """Megatron-Core's local duplicated `Linear`, checkpointed as one replica per tensor-parallel rank.

    The parent's sharded_state_dict has no tensor-parallel group (a duplicated linear
    is built without one), so every TP rank would claim to hold the main replica.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            sharded_offsets=sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )


def build_replicated_linear(spec, config: DeepSeekV4TransformerConfig, input_size: int, output_size: int, name: str):
    """A linear whose full weight lives on every tensor-parallel rank (`parallel_mode="duplicated"`).

    Megatron-Core's local `Linear` starts from torch's default initialisation, so the
    config's init_method is applied here to make it behave like the parallel linears.
    """
    linear = build_module(
        spec,
        input_size,
        output_size,
        parallel_mode="duplicated",
        config=config,
        init_method=config.init_method,
        bias=False,
        skip_bias_add=False,
        skip_weight_param_allocation=False,
        is_expert=False,
        tp_comm_buffer_name=name,
        tp_group=None,
    )
    if config.perform_initialization and isinstance(linear, torch.nn.Linear):
        with torch.no_grad():
            config.init_method(linear.weight)
    return linear


class DeepSeekV4Compressor(MegatronModule):
    """Pools every `compress_ratio` tokens into one entry of width `head_dim`.

    forward(hidden_states [s, b, D], first_entry=0) -> entries first_entry, first_entry + 1, ...
    [n, b, head_dim] of the complete windows, in the input's dtype; hidden_states start at the
    first token those entries pool (window first_entry, or first_entry - 1 for CSA when
    first_entry > 0), and may come as consecutive row blocks (a context-parallel rank's halo and
    chunk), projected block by block so that they are never concatenated. The pooling runs in
    float32 (as the reference does).
    """

    def __init__(
        self,
        config: DeepSeekV4TransformerConfig,
        submodules: DeepSeekV4CompressorSubmodules,
        compress_ratio: int,
        head_dim: int,
    ):
        super().__init__(config=config)
        if compress_ratio not in (CSA, HCA):
            raise ValueError(
                f"compress_ratio={compress_ratio}: a compressor exists only on CSA ({CSA}) "
                f"or HCA ({HCA}) layers"
            )
        self.compress_ratio = compress_ratio
        self.head_dim = head_dim
        self.overlapping = compress_ratio == CSA
        # Tokens one entry pools: its window, and for CSA the window before it.
        self.span = (2 if self.overlapping else 1) * compress_ratio
        pooled_width = (2 if self.overlapping else 1) * head_dim
        self.linear_kv = build_replicated_linear(
            submodules.linear_kv, config, config.hidden_size, pooled_width, "compressor_kv"
        )
        self.linear_gate = build_replicated_linear(
            submodules.linear_gate, config, config.hidden_size, pooled_width, "compressor_gate"
        )
        # Kept in float32 like the checkpoint; zeros = no positional preference inside a window.
        self.ape = torch.nn.Parameter(torch.zeros(compress_ratio, pooled_width, dtype=torch.float32))
        self.norm = build_module(
            submodules.norm, config=config, hidden_size=head_dim, eps=config.layernorm_epsilon
        )
        self.rotary = DeepSeekV4RotaryEmbedding(config, compressed=True)

    def forward(self, hidden_states: torch.Tensor | list[torch.Tensor], first_entry: int = 0) -> torch.Tensor:
        blocks = [hidden_states] if isinstance(hidden_states, torch.Tensor) else hidden_states
        batch, dtype = blocks[0].shape[1], blocks[0].dtype
        # CSA from a later entry on: the first window only lends its A halves to the next entry.
        predecessor = 1 if self.overlapping and first_entry > 0 else 0
        num_entries = sum(block.shape[0] for block in blocks) // self.compress_ratio
        if num_entries <= predecessor:
            return blocks[0].new_zeros(0, batch, self.head_dim)
        complete, remaining = [], num_entries * self.compress_ratio
        for block in blocks:
            complete.append(block[:remaining])
            remaining -= complete[-1].shape[0]
        values = torch.cat([self.linear_kv(block)[0] for block in complete]).float()
        gates = torch.cat([self.linear_gate(block)[0] for block in complete]).float()
        # [entry, slot in window, batch, channels]; ape is indexed by the slot.
        values = values.unflatten(0, (num_entries, self.compress_ratio))
        gates = gates.unflatten(0, (num_entries, self.compress_ratio)) + self.ape.unsqueeze(1)
        if self.overlapping:
            values, gates = self._overlapping_slots(values, gates)
        pooled = (values[predecessor:] * gates[predecessor:].softmax(dim=1)).sum(dim=1)
        entries = self.norm(pooled.to(dtype))
        entry_ids = torch.arange(first_entry, first_entry + num_entries - predecessor, device=pooled.device)
        positions = entry_ids * self.compress_ratio
        cos, sin = self.rotary(positions)
        return apply_rotary(entries, cos.unsqueeze(1), sin.unsqueeze(1))

    def start_decode(
        self, hidden_states: torch.Tensor, entries: torch.Tensor, max_sequence_length: int
    ) -> CompressorDecodeState:
        """The decode state after a prefill of `hidden_states` [s, b, D] that produced `entries`.

        Only the unfinished window (and, for CSA, the last complete one) is recomputed:
        at most 2m tokens.
        """
        seq_len, batch, _ = hidden_states.shape
        m, width = self.compress_ratio, self.head_dim
        pooled_width = self.ape.shape[-1]
        state = CompressorDecodeState(
            values=hidden_states.new_zeros(m, batch, pooled_width, dtype=torch.float32),
            gates=hidden_states.new_zeros(m, batch, pooled_width, dtype=torch.float32),
            previous_values=None,
            previous_gates=None,
            entries=hidden_states.new_empty(max_sequence_length // m, batch, width),
        )
        state.append_entries(entries)
        complete = entries.shape[0] * m
        if self.overlapping:
            state.previous_values = hidden_states.new_zeros(m, batch, width, dtype=torch.float32)
            state.previous_gates = torch.full_like(state.previous_values, float("-inf"))
            if complete:
                values, gates = self._slot_terms(hidden_states[complete - m : complete], 0)
                state.previous_values.copy_(values[..., :width])
                state.previous_gates.copy_(gates[..., :width])
        if complete < seq_len:
            values, gates = self._slot_terms(hidden_states[complete:], 0)
            state.values[: seq_len - complete] = values
            state.gates[: seq_len - complete] = gates
        return state

    def decode_step(self, hidden_state: torch.Tensor, position: int, state: CompressorDecodeState) -> None:
        """Add the token at `position` (hidden_state [b, D]); emit an entry when its window completes."""
        m, width = self.compress_ratio, self.head_dim
        slot = position % m
        values, gates = self._slot_terms(hidden_state.unsqueeze(0), slot)
        state.values[slot], state.gates[slot] = values[0], gates[0]
        if slot != m - 1:
            return
        values, gates = state.values, state.gates
        if self.overlapping:
            values = torch.cat((state.previous_values, values[..., width:]), dim=0)
            gates = torch.cat((state.previous_gates, gates[..., width:]), dim=0)
            state.previous_values = state.values[..., :width].clone()
            state.previous_gates = state.gates[..., :width].clone()
        pooled = (values * gates.softmax(dim=0)).sum(dim=0)
        entry = self.norm(pooled.to(hidden_state.dtype))
        cos, sin = self.rotary(torch.tensor(position + 1 - m, device=hidden_state.device))
        state.append_entries(apply_rotary(entry, cos, sin).unsqueeze(0))

    def _slot_terms(self, hidden_states: torch.Tensor, first_slot: int):
        """float32 (a, z + ape) of consecutive tokens starting at window slot `first_slot`."""
        slots = slice(first_slot, first_slot + hidden_states.shape[0])
        values = self.linear_kv(hidden_states)[0].float()
        gates = self.linear_gate(hidden_states)[0].float() + self.ape[slots].unsqueeze(1)
        return values, gates

    def _overlapping_slots(self, values: torch.Tensor, gates: torch.Tensor):
        """CSA: entry w pools window w-1's A halves and window w's B halves (2m slots)."""
        width = self.head_dim
        values_a, values_b = values[..., :width], values[..., width:]
        gates_a, gates_b = gates[..., :width], gates[..., width:]
        # Window 0 has no predecessor: its A slots hold zeros with gate -inf (softmax weight 0).
        no_values = torch.zeros_like(values_a[:1])
        no_gates = torch.full_like(gates_a[:1], float("-inf"))
        previous_values = torch.cat((no_values, values_a[:-1]), dim=0)
        previous_gates = torch.cat((no_gates, gates_a[:-1]), dim=0)
        return torch.cat((previous_values, values_b), dim=1), torch.cat((previous_gates, gates_b), dim=1)
