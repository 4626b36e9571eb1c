"""How a smaller DeepSeek-V4 is cut out of a bigger one: which layers, experts, heads and channels it keeps.

Every official tensor kind has one row in a rule table: the index rule of each of its dims, by axis
name (`AXES`). An axis rule gives the source indices the slice keeps along that dim, so that what
the kept part computed in the big model it still computes in the small one:

- `hidden`, `vocab`, `q_rank`, `expert_ffn`, ...: the first `n` (a prefix of the dim).
- `streams*hidden`: the first D' channels of each of the hc_mult residual streams (the
  hyper-connection weights read the streams flattened stream-major, [n*D]).
- `heads`: whole query heads: the first o_groups' output groups, and in each of them its first
  H'/G' heads (the grouped output projection `wo_a` mixes the heads of one group only, DeepSeek-V4
  report, "grouped output projection"; transformers `DeepseekV4GroupedLinear`).
- `*head_dim`, `*index_dim`: within a head the RoPE dims are the LAST qk_rope_head_dim channels
  (the official inference `model.py` and transformers rotate the last rope_head_dim channels), so a
  smaller head keeps its first (c' - r) non-rope channels and its last r rope channels.
- `overlap*...`: the CSA compressors project to two halves [A | B] of width c each (transformers
  `DeepseekV4CSACompressor`: `chunk_kv[..., :head_dim]` and `[..., head_dim:]`); each half is cut
  like a head. HCA compressors have one half.
- `experts`: the kept experts of that block (`experts_by_gate_norm`, or a given list), the same for `gate.weight`,
  `gate.bias` and every expert tensor; hash tables are remapped (`remap_hash_table`).
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bridge.hf_config import DeepSeekV4HFConfig

COPY, SLICE, INIT = "COPY", "SLICE", "INIT"
ALL = "all"
"""The axis rule that keeps a dim whole."""
CSA_RATIO = 4
"""Compress ratio whose compressors use two overlapping halves (official `model.py`: overlap = ratio == 4)."""


class SliceError(ValueError):
    """A slice the source cannot give: the message names the config key, layer or tensor."""


# --- the rule tables: official tensor -> the axis rule of each dim ------------------------------------
TOP_RULES = {
    "embed.weight": ("vocab", "hidden"),
    "head.weight": ("vocab", "hidden"),
    "norm.weight": ("hidden",),
    "hc_head_fn": (ALL, "streams*hidden"),
    "hc_head_base": (ALL,),
    "hc_head_scale": (ALL,),
}

BLOCK_RULES = {
    "attn_norm.weight": ("hidden",),
    "ffn_norm.weight": ("hidden",),
    "hc_attn_fn": (ALL, "streams*hidden"),
    "hc_attn_base": (ALL,),
    "hc_attn_scale": (ALL,),
    "hc_ffn_fn": (ALL, "streams*hidden"),
    "hc_ffn_base": (ALL,),
    "hc_ffn_scale": (ALL,),
    "attn.attn_sink": ("heads",),
    "attn.wq_a.weight": ("q_rank", "hidden"),
    "attn.q_norm.weight": ("q_rank",),
    "attn.wq_b.weight": ("heads*head_dim", "q_rank"),
    "attn.wkv.weight": ("head_dim", "hidden"),
    "attn.kv_norm.weight": ("head_dim",),
    "attn.wo_a.weight": ("groups*o_rank", "group_heads*head_dim"),
    "attn.wo_b.weight": ("hidden", "groups*o_rank"),
    "attn.compressor.wkv.weight": ("overlap*head_dim", "hidden"),
    "attn.compressor.wgate.weight": ("overlap*head_dim", "hidden"),
    "attn.compressor.ape": (ALL, "overlap*head_dim"),
    "attn.compressor.norm.weight": ("head_dim",),
    "attn.indexer.wq_b.weight": ("index_heads*index_dim", "q_rank"),
    "attn.indexer.weights_proj.weight": ("index_heads", "hidden"),
    "attn.indexer.compressor.wkv.weight": ("overlap*index_dim", "hidden"),
    "attn.indexer.compressor.wgate.weight": ("overlap*index_dim", "hidden"),
    "attn.indexer.compressor.ape": (ALL, "overlap*index_dim"),
    "attn.indexer.compressor.norm.weight": ("index_dim",),
    "ffn.gate.weight": ("experts", "hidden"),
    "ffn.gate.bias": ("experts",),
    "ffn.gate.tid2eid": ("vocab", "top_k"),
    "ffn.experts.{expert}.w1.weight": ("expert_ffn", "hidden"),
    "ffn.experts.{expert}.w2.weight": ("hidden", "expert_ffn"),
    "ffn.experts.{expert}.w3.weight": ("expert_ffn", "hidden"),
    "ffn.shared_experts.w1.weight": ("expert_ffn", "hidden"),
    "ffn.shared_experts.w2.weight": ("hidden", "expert_ffn"),
    "ffn.shared_experts.w3.weight": ("expert_ffn", "hidden"),
}

MTP_RULES = {
    **BLOCK_RULES,
    "e_proj.weight": ("hidden", "hidden"),
    "h_proj.weight": ("hidden", "hidden"),
    "enorm.weight": ("hidden",),
    "hnorm.weight": ("hidden",),
    "norm.weight": ("hidden",),
    "hc_head_fn": (ALL, "streams*hidden"),
    "hc_head_base": (ALL,),
    "hc_head_scale": (ALL,),
}

# Tensors a hash layer has and a learned-routing layer has not, and the other way round. When a kept
# layer changes kind (a learned-routing source layer inside the slice's num_hash_layers, or a hash
# source layer past them) the one it lacks has no source: INIT, as described here.
HASH_ONLY, LEARNED_ONLY = "ffn.gate.tid2eid", "ffn.gate.bias"
INIT_RULES = {
    LEARNED_ONLY: "zeros (the aux-loss-free balancing bias starts at 0, DeepSeek-V3 report)",
    HASH_ONLY: "a random balanced table from --seed: each token's top_k distinct experts",
}

# Config fields the slice may make smaller, each the size of its axis of the same name; and the
# fields it must keep, with why.
SHRINKABLE = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "q_rank": "q_lora_rank",
    "o_rank": "o_lora_rank",
    "groups": "o_groups",
    "heads": "num_attention_heads",
    "head_dim": "head_dim",
    "index_heads": "index_n_heads",
    "index_dim": "index_head_dim",
    "experts": "num_routed_experts",
    "expert_ffn": "moe_intermediate_size",
    "top_k": "num_experts_per_tok",
    "layers": "num_layers",
    "mtp": "num_nextn_predict_layers",
}
KEPT = {
    "qk_rope_head_dim": "RoPE frequencies base^(-2i/r) depend on r, so a different rope dim changes their meaning",
    "hc_mult": "each hyper-connection weight mixes exactly hc_mult streams",
    "num_shared_experts": "the shared expert tensors have no expert index to choose by",
}


# --- index rules --------------------------------------------------------------------------------------
def first(n: int) -> torch.Tensor:
    return torch.arange(n)


def blocks(kept: torch.Tensor, size: int, within: torch.Tensor) -> torch.Tensor:
    """Indices `b * size + i` for each kept block b (in order) and each i of `within`."""
    return (kept[:, None] * size + within[None, :]).reshape(-1)


def head_channels(width: int, kept_width: int, rope: int) -> torch.Tensor:
    """A head's kept channels: its first `kept_width - rope` (non-rope) and its last `rope` (RoPE)."""
    return torch.cat([first(kept_width - rope), torch.arange(width - rope, width)])


@dataclass(frozen=True)
class BlockContext:
    """What the index rules of one block (a layer or an MTP layer) need."""

    src: DeepSeekV4HFConfig
    dst: DeepSeekV4HFConfig
    ratio: int
    experts: torch.Tensor | None
    """The source experts this block keeps, in the order of the slice's experts."""

    @property
    def overlap(self) -> torch.Tensor:
        return first(2 if self.ratio == CSA_RATIO else 1)

    def kept_groups(self) -> torch.Tensor:
        return first(self.dst.o_groups)

    def group_heads(self) -> torch.Tensor:
        """Within a kept group, its kept heads."""
        return first(self.dst.num_attention_heads // self.dst.o_groups)

    def heads(self) -> torch.Tensor:
        return blocks(self.kept_groups(), self.src.num_attention_heads // self.src.o_groups, self.group_heads())

    def channels(self) -> torch.Tensor:
        return head_channels(self.src.head_dim, self.dst.head_dim, self.src.qk_rope_head_dim)

    def index_channels(self) -> torch.Tensor:
        return head_channels(self.src.index_head_dim, self.dst.index_head_dim, self.src.qk_rope_head_dim)


AXES: dict[str, Callable[[BlockContext], torch.Tensor]] = {
    "vocab": lambda b: first(b.dst.vocab_size),
    "hidden": lambda b: first(b.dst.hidden_size),
    "streams*hidden": lambda b: blocks(first(b.src.hc_mult), b.src.hidden_size, first(b.dst.hidden_size)),
    "q_rank": lambda b: first(b.dst.q_lora_rank),
    "heads": BlockContext.heads,
    "heads*head_dim": lambda b: blocks(b.heads(), b.src.head_dim, b.channels()),
    "head_dim": BlockContext.channels,
    "overlap*head_dim": lambda b: blocks(b.overlap, b.src.head_dim, b.channels()),
    "groups*o_rank": lambda b: blocks(b.kept_groups(), b.src.o_lora_rank, first(b.dst.o_lora_rank)),
    "group_heads*head_dim": lambda b: blocks(b.group_heads(), b.src.head_dim, b.channels()),
    "index_heads": lambda b: first(b.dst.index_n_heads),
    "index_heads*index_dim": lambda b: blocks(first(b.dst.index_n_heads), b.src.index_head_dim, b.index_channels()),
    "index_dim": BlockContext.index_channels,
    "overlap*index_dim": lambda b: blocks(b.overlap, b.src.index_head_dim, b.index_channels()),
    "experts": lambda b: b.experts,
    "expert_ffn": lambda b: first(b.dst.moe_intermediate_size),
    "top_k": lambda b: first(b.dst.num_experts_per_tok),
}


# --- checks ---------------------------------------------------------------------------------------------
def check_sliceable(src: DeepSeekV4HFConfig, dst: DeepSeekV4HFConfig) -> None:
    """Raise SliceError, naming the config key, when `dst` cannot be cut out of `src`."""
    for field in SHRINKABLE.values():
        if getattr(dst, field) > getattr(src, field):
            raise SliceError(f"config {field}={getattr(dst, field)} is larger than the source's {getattr(src, field)}; "
                             "a slice can only keep or shrink it")
    for field, why in KEPT.items():
        if getattr(dst, field) != getattr(src, field):
            raise SliceError(f"config {field}={getattr(dst, field)} differs from the source's {getattr(src, field)}; "
                             f"a slice keeps it ({why})")
    rope = src.qk_rope_head_dim
    for field in ("head_dim", "index_head_dim"):
        if getattr(dst, field) < rope:
            raise SliceError(f"config {field}={getattr(dst, field)} cannot hold the {rope} RoPE dims "
                             f"(qk_rope_head_dim) that every head keeps")
    if dst.num_attention_heads % dst.o_groups:
        raise SliceError(f"config num_attention_heads={dst.num_attention_heads} is not a multiple of "
                         f"o_groups={dst.o_groups}")
    per_group, src_per_group = dst.num_attention_heads // dst.o_groups, src.num_attention_heads // src.o_groups
    if per_group > src_per_group:
        raise SliceError(f"config has {per_group} heads per output group (num_attention_heads/o_groups) but the "
                         f"source only {src_per_group}; heads are kept whole within their groups")
    if dst.num_experts_per_tok > dst.num_routed_experts:
        raise SliceError(f"config num_experts_per_tok={dst.num_experts_per_tok} exceeds "
                         f"n_routed_experts={dst.num_routed_experts}")


# --- layers ---------------------------------------------------------------------------------------------
def stride_layers(num_src: int, num_dst: int) -> list[int]:
    """`num_dst` source layers spread evenly from the first to the last (i * (L-1) / (L'-1), rounded half up)."""
    if num_dst == 1:
        return [0]
    return [(2 * i * (num_src - 1) + num_dst - 1) // (2 * (num_dst - 1)) for i in range(num_dst)]


def choose_layers(src: DeepSeekV4HFConfig, dst: DeepSeekV4HFConfig, layers: list[int] | None) -> list[int]:
    """The source layer of each slice layer; refuses a config whose compress ratios disagree with them."""
    layers = stride_layers(src.num_layers, dst.num_layers) if layers is None else list(layers)
    if len(layers) != dst.num_layers:
        raise SliceError(f"--layers gives {len(layers)} layers; the config has num_hidden_layers={dst.num_layers}")
    if any(not 0 <= n < src.num_layers for n in layers) or any(a >= b for a, b in itertools.pairwise(layers)):
        raise SliceError(f"--layers {layers}: give increasing source layers in 0..{src.num_layers - 1}")
    ratios = [src.compress_ratios[n] for n in layers]
    for i, (n, ratio) in enumerate(zip(layers, ratios)):
        if dst.compress_ratios[i] != ratio:
            raise SliceError(
                f"slice layer {i} is source layer {n} with compress ratio {ratio} but the config gives "
                f"{dst.compress_ratios[i]}; set compress_ratios to {ratios + [0] * dst.num_nextn_predict_layers} "
                f"or choose --layers")
    return layers


# --- experts --------------------------------------------------------------------------------------------
def experts_by_gate_norm(gate: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` experts with the largest gate-row L2 norms, in source order (ties: the lower id)."""
    norms = torch.linalg.vector_norm(gate.float(), dim=1)
    order = torch.sort(-norms, stable=True).indices
    return torch.sort(order[:count]).values


def read_expert_file(path: str) -> list[int] | dict[str, list[int]]:
    """A JSON list of source expert ids (every block), or {"layers.N" | "mtp.K": [ids]} per source block."""
    with open(path) as f:
        chosen = json.load(f)
    if not isinstance(chosen, (list, dict)):
        raise SliceError(f"--experts {path}: expected a JSON list of expert ids or an object of lists per block")
    return chosen


def check_experts(ids, block: str, src_count: int, dst_count: int) -> torch.Tensor:
    if (not isinstance(ids, list) or len(ids) != dst_count or len(set(ids)) != len(ids)
            or any(not isinstance(e, int) or not 0 <= e < src_count for e in ids)):
        raise SliceError(f"--experts for {block}: expected {dst_count} distinct expert ids in 0..{src_count - 1}, "
                         f"got {ids!r}")
    return torch.tensor(ids)


def remap_hash_table(table: torch.Tensor, kept: torch.Tensor, top_k: int) -> torch.Tensor:
    """A hash layer's tid2eid [V, k] for the kept experts: each token's first `top_k` picks, a kept expert
    renumbered to its place in `kept`, a dropped one replaced by the kept expert with the fewest tokens so
    far that the token does not already use (ties: the lower id); rows are filled in token order."""
    new_id = torch.full((max(int(table.max()), int(kept.max())) + 1,), -1, dtype=torch.long)
    new_id[kept] = first(len(kept))
    mapped = new_id[table[:, :top_k].long()]
    loads = torch.bincount(mapped[mapped >= 0], minlength=len(kept)).tolist()
    heap = [(load, e) for e, load in enumerate(loads)]
    heapq.heapify(heap)
    rows = mapped.tolist()
    for row in (r for r in rows if -1 in r):
        for j, expert in enumerate(row):
            if expert >= 0:
                continue
            skipped = []
            while heap[0][1] in row:
                skipped.append(heapq.heappop(heap))
            load, chosen = heapq.heappop(heap)
            row[j] = chosen
            heapq.heappush(heap, (load + 1, chosen))
            for item in skipped:
                heapq.heappush(heap, item)
    return torch.tensor(rows, dtype=table.dtype)


def random_hash_table(vocab: int, experts: int, top_k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(vocab, experts, generator=g).argsort(dim=1)[:, :top_k].to(dtype)


# --- one tensor's plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRule:
    """How one slice tensor is made: from which source tensor, by which index rule per dim."""

    name: str
    kind: str
    source: str | None
    axes: tuple[str, ...] = ()
    index: tuple[torch.Tensor | None, ...] = ()
    """Per dim: the kept source indices, or None for the whole dim."""
    kept_experts: torch.Tensor | None = None
    """For a hash table: remap its values to these experts."""
    init: str | None = None

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n if i is None else len(i) for n, i in zip(source_shape, self.index))

    def apply(self, values: torch.Tensor, top_k: int) -> torch.Tensor:
        for dim, index in enumerate(self.index):
            if index is not None:
                values = values.index_select(dim, index)
        if self.kept_experts is not None:
            values = remap_hash_table(values, self.kept_experts, top_k)
        return values

    def provenance(self) -> dict:
        entry = {"kind": self.kind, "source": self.source}
        if self.kind == INIT:
            entry["init"] = self.init
            return entry
        entry["rule"] = list(self.axes)
        entry["index"] = [ALL if i is None else runs(i) for i in self.index]
        if self.kept_experts is not None:
            entry["values"] = "expert ids remapped to the kept experts (dropped ones: least-loaded kept expert)"
        return entry


def runs(index: torch.Tensor) -> list[list[int]]:
    """Indices as [start, stop) runs of consecutive values."""
    out: list[list[int]] = []
    for i in index.tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


EXPERT_IN_NAME = re.compile(r"^ffn\.experts\.\d+\.")


def rule_key(suffix: str) -> str:
    """The rule-table key of an official name (a block's names without their `layers.N.`/`mtp.K.` prefix)."""
    return EXPERT_IN_NAME.sub("ffn.experts.{expert}.", suffix)


def tensor_rule(name: str, source: str, suffix: str, source_shape: tuple[int, ...], rules: dict,
                block: BlockContext) -> TensorRule:
    """The rule of slice tensor `name`, cut from `source` (whose name ends in `suffix`) by its row in `rules`."""
    key = rule_key(suffix)
    axes = rules.get(key)
    if axes is None:
        raise SliceError(f"tensor {source!r}: no slicing rule for {key!r} (add one to bridge/slicing.py)")
    if len(axes) != len(source_shape):
        raise SliceError(f"tensor {source!r} has shape {list(source_shape)}; its rule {axes} expects {len(axes)} dims")
    index = []
    for axis, extent in zip(axes, source_shape):
        kept = None if axis == ALL else AXES[axis](block)
        index.append(None if kept is None or torch.equal(kept, first(extent)) else kept)
    remap = key == HASH_ONLY and not torch.equal(block.experts, first(block.src.num_routed_experts))
    kind = SLICE if remap or any(i is not None for i in index) else COPY
    return TensorRule(name, kind, source, tuple(axes), tuple(index), block.experts if remap else None)
