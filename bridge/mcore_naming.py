"""Megatron-Core parameter names of `megatron_v4.model.DeepSeekV4Model` <-> official checkpoint names.

The mapping is data: one `TensorRule` per Megatron-Core tensor, giving the
official tensor(s) it comes from and how it is split across ranks. A rule with
two official names concatenates them on dim 0 (SwiGLU's w1 then w3 into
`linear_fc1`). Rules are grouped in scopes: the top level, the decoder layers,
and the MTP layers (whose `transformer_layer` is an ordinary block).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.name_templates import Template, TemplateIndex

SEQUENTIAL_EXPERTS = "sequential"
"""Megatron-Core's SequentialMLP: `mlp.experts.local_experts.{e}.linear_fc1.weight`."""
GROUPED_EXPERTS = "grouped"
"""Transformer-Engine's TEGroupedMLP: `mlp.experts.linear_fc1.weight{e}`."""
EXPERT_FORMS = (SEQUENTIAL_EXPERTS, GROUPED_EXPERTS)


@dataclass(frozen=True)
class Sharding:
    """How one Megatron-Core tensor is split over ranks.

    `dim` is split evenly over the tensor-parallel ranks (the expert-tensor-parallel
    ranks for routed experts); `unit` names what is being divided, for messages.
    `glu` marks a [w1; w3] tensor whose two halves are split separately, so that
    each rank holds [w1 part; w3 part]. `by_expert` distributes the `{expert}`
    index over the expert-parallel ranks.
    """

    dim: int | None = None
    unit: str = ""
    glu: bool = False
    by_expert: bool = False


REPLICATED = Sharding()
BY_HEADS = Sharding(dim=0, unit="attention heads")
BY_O_GROUP_ROWS = Sharding(dim=0, unit="output-projection groups")
BY_O_GROUP_COLUMNS = Sharding(dim=1, unit="output-projection groups")
BY_INDEX_HEADS = Sharding(dim=0, unit="indexer heads")
BY_VOCAB = Sharding(dim=0, unit="vocabulary rows")
BY_HIDDEN_ROWS = Sharding(dim=0, unit="hidden units")
GLU_COLUMNS = Sharding(dim=0, unit="ffn hidden units", glu=True)
FFN_ROWS = Sharding(dim=1, unit="ffn hidden units")
EXPERT_GLU_COLUMNS = Sharding(dim=0, unit="expert ffn hidden units", glu=True, by_expert=True)
EXPERT_FFN_ROWS = Sharding(dim=1, unit="expert ffn hidden units", by_expert=True)


@dataclass(frozen=True)
class TensorRule:
    """One Megatron-Core tensor: its name template, its official source(s), its sharding."""

    mcore: str
    official: tuple[str, ...]
    sharding: Sharding = REPLICATED

    @property
    def fused(self) -> bool:
        return len(self.official) > 1


def _rule(mcore: str, *official: str, sharding: Sharding = REPLICATED) -> TensorRule:
    return TensorRule(mcore, tuple(official), sharding)


def _hyper_connection(mcore: str, official: str) -> list[TensorRule]:
    return [_rule(f"{mcore}.{part}", f"{official}_{part}") for part in ("fn", "base", "scale")]


def _compressor(mcore: str, official: str) -> list[TensorRule]:
    return [
        _rule(f"{mcore}.linear_kv.weight", f"{official}.wkv.weight"),
        _rule(f"{mcore}.linear_gate.weight", f"{official}.wgate.weight"),
        _rule(f"{mcore}.ape", f"{official}.ape"),
        _rule(f"{mcore}.norm.weight", f"{official}.norm.weight"),
    ]


ATTENTION_RULES = [
    _rule("input_layernorm.weight", "attn_norm.weight"),
    _rule("self_attention.linear_q_down_proj.weight", "attn.wq_a.weight"),
    _rule("self_attention.q_layernorm.weight", "attn.q_norm.weight"),
    _rule("self_attention.linear_q_up_proj.weight", "attn.wq_b.weight", sharding=BY_HEADS),
    _rule("self_attention.linear_kv.weight", "attn.wkv.weight"),
    _rule("self_attention.kv_layernorm.weight", "attn.kv_norm.weight"),
    _rule("self_attention.attn_sink", "attn.attn_sink", sharding=BY_HEADS),
    _rule("self_attention.linear_o_down_proj.weight", "attn.wo_a.weight", sharding=BY_O_GROUP_ROWS),
    _rule("self_attention.linear_proj.weight", "attn.wo_b.weight", sharding=BY_O_GROUP_COLUMNS),
    *_compressor("self_attention.compressor", "attn.compressor"),
    _rule("self_attention.indexer.linear_q_up_proj.weight", "attn.indexer.wq_b.weight", sharding=BY_INDEX_HEADS),
    _rule("self_attention.indexer.linear_weights_proj.weight", "attn.indexer.weights_proj.weight",
          sharding=BY_INDEX_HEADS),
    *_compressor("self_attention.indexer.compressor", "attn.indexer.compressor"),
]

MOE_RULES = [
    _rule("pre_mlp_layernorm.weight", "ffn_norm.weight"),
    _rule("mlp.router.weight", "ffn.gate.weight"),
    _rule("mlp.router.expert_bias", "ffn.gate.bias"),
    _rule("mlp.router.tid2eid", "ffn.gate.tid2eid"),
    _rule("mlp.shared_experts.linear_fc1.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight",
          sharding=GLU_COLUMNS),
    _rule("mlp.shared_experts.linear_fc2.weight", "ffn.shared_experts.w2.weight", sharding=FFN_ROWS),
]

ROUTED_EXPERT_RULES = {
    SEQUENTIAL_EXPERTS: [
        _rule("mlp.experts.local_experts.{expert}.linear_fc1.weight",
              "ffn.experts.{expert}.w1.weight", "ffn.experts.{expert}.w3.weight", sharding=EXPERT_GLU_COLUMNS),
        _rule("mlp.experts.local_experts.{expert}.linear_fc2.weight", "ffn.experts.{expert}.w2.weight",
              sharding=EXPERT_FFN_ROWS),
    ],
    GROUPED_EXPERTS: [
        _rule("mlp.experts.linear_fc1.weight{expert}",
              "ffn.experts.{expert}.w1.weight", "ffn.experts.{expert}.w3.weight", sharding=EXPERT_GLU_COLUMNS),
        _rule("mlp.experts.linear_fc2.weight{expert}", "ffn.experts.{expert}.w2.weight", sharding=EXPERT_FFN_ROWS),
    ],
}


def block_rules(expert_form: str) -> list[TensorRule]:
    """Rules of one transformer block (decoder layer, or an MTP layer's `transformer_layer`)."""
    return [
        *_hyper_connection("hc_attn", "hc_attn"),
        *_hyper_connection("hc_ffn", "hc_ffn"),
        *ATTENTION_RULES,
        *MOE_RULES,
        *ROUTED_EXPERT_RULES[expert_form],
    ]


TOP_RULES = [
    _rule("embedding.word_embeddings.weight", "embed.weight", sharding=BY_VOCAB),
    *_hyper_connection("decoder.hc_head", "hc_head"),
    _rule("decoder.final_layernorm.weight", "norm.weight"),
    _rule("output_layer.weight", "head.weight", sharding=BY_VOCAB),
]

MTP_RULES = [
    _rule("enorm.weight", "enorm.weight"),
    _rule("hnorm.weight", "hnorm.weight"),
    _rule("e_proj.weight", "e_proj.weight", sharding=BY_HIDDEN_ROWS),
    _rule("h_proj.weight", "h_proj.weight", sharding=BY_HIDDEN_ROWS),
    *_hyper_connection("hc_head", "hc_head"),
    _rule("final_layernorm.weight", "norm.weight"),
]

DECODER_LAYER_PREFIX = ("decoder.layers.{layer}.", "layers.{layer}.")
MTP_LAYER_PREFIX = ("mtp.layers.{mtp}.", "mtp.{mtp}.")
MTP_BLOCK_PREFIX = ("mtp.layers.{mtp}.transformer_layer.", "mtp.{mtp}.")


def _scoped(rules: list[TensorRule], mcore_prefix: str, official_prefix: str) -> list[TensorRule]:
    return [
        TensorRule(mcore_prefix + r.mcore, tuple(official_prefix + o for o in r.official), r.sharding)
        for r in rules
    ]


def all_rules(expert_form: str = SEQUENTIAL_EXPERTS) -> list[TensorRule]:
    """Every rule with full names, for one Megatron-Core expert form."""
    if expert_form not in EXPERT_FORMS:
        raise ValueError(f"unknown expert form {expert_form!r}; use one of {EXPERT_FORMS}")
    block = block_rules(expert_form)
    return [
        *TOP_RULES,
        *_scoped(block, *DECODER_LAYER_PREFIX),
        *_scoped(MTP_RULES, *MTP_LAYER_PREFIX),
        *_scoped(block, *MTP_BLOCK_PREFIX),
    ]


class UnknownTensorError(KeyError):
    """A tensor name that no rule of the naming knows."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class RuleMatch:
    rule: TensorRule
    values: dict[str, int]
    part: int = 0
    """Which of the rule's official names matched (0 unless the rule is fused)."""

    @property
    def mcore_name(self) -> str:
        return Template(self.rule.mcore).format(self.values)

    @property
    def official_names(self) -> list[str]:
        return [Template(o).format(self.values) for o in self.rule.official]


class MCoreNaming:
    """Looks up the rule of a Megatron-Core name or of an official name."""

    def __init__(self, expert_form: str = SEQUENTIAL_EXPERTS):
        self.expert_form = expert_form
        self.rules = all_rules(expert_form)
        self._by_mcore = TemplateIndex((r.mcore, r) for r in self.rules)
        self._by_official = TemplateIndex(
            (official, (r, part)) for r in self.rules for part, official in enumerate(r.official)
        )

    def from_mcore(self, name: str) -> RuleMatch:
        found = self._by_mcore.match(name)
        if found is None:
            raise UnknownTensorError(
                f"Megatron-Core tensor {name!r} has no rule in bridge/mcore_naming.py "
                f"(expert form {self.expert_form!r}); add one or check the model's parameter names"
            )
        rule, values = found
        return RuleMatch(rule, values)

    def from_official(self, name: str) -> RuleMatch:
        found = self._by_official.match(name)
        if found is None:
            raise UnknownTensorError(
                f"official DeepSeek-V4 tensor {name!r} has no rule in bridge/mcore_naming.py; "
                "is this a DeepSeek-V4 checkpoint?"
            )
        (rule, part), values = found
        return RuleMatch(rule, values, part)

    def official_templates(self) -> list[str]:
        return self._by_official.templates()


def detect_expert_form(mcore_names) -> str:
    """The Megatron-Core expert form that a model's tensor names use (sequential when it has no experts)."""
    for name in mcore_names:
        if ".mlp.experts.local_experts." in name:
            return SEQUENTIAL_EXPERTS
        if ".mlp.experts.linear_fc" in name:
            return GROUPED_EXPERTS
    return SEQUENTIAL_EXPERTS
