"""The Hugging Face namings of DeepSeek-V4 tensors, each as a table against the official names.

- `official`: the released checkpoints' flat names (`layers.3.attn.wq_a.weight`, `embed.weight`).
- `transformers-saved`: what `DeepseekV4ForCausalLM.save_pretrained` writes: the official per-layer
  names under `model.`, but `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_fn`,
  `head.weight`, and the attention's kv norm as `attn.norm.weight` (transformers renames
  `.kv_norm.` back to `.norm.` when saving).
- `transformers-module`: the `state_dict()` of a `DeepseekV4ForCausalLM` in memory
  (`model.layers.3.self_attn.q_a_proj.weight`, ...), with each layer's routed experts stacked into
  `mlp.experts.gate_up_proj` [E, 2I, D] (w1 rows first) and `mlp.experts.down_proj` [E, D, I].
- `official-model-prefix`: the official names under `model.`, as the text weights of the DeepSeek-V4-Flash
  vision variant are stored; its other tensors (the vision encoder's and the aligner's) are carried
  unchanged, not converted. Its MTP tensors are `model.mtp.{k}.*`.

transformers builds no MTP layers (its loader ignores `mtp.*`), so it has no names for them: its
namings carry MTP tensors under their official names `mtp.{k}.*`. A directory saved this way
still loads in transformers, and round trips through any naming keep the MTP weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from bridge.mcore_naming import MCoreNaming, UnknownTensorError
from bridge.name_templates import Template, TemplateIndex

OFFICIAL = "official"
TRANSFORMERS_SAVED = "transformers-saved"
TRANSFORMERS_MODULE = "transformers-module"
OFFICIAL_MODEL_PREFIX = "official-model-prefix"

OFFICIAL_LAYER_PREFIX = "layers.{layer}."
MTP_PREFIX = "mtp.{mtp}."


@dataclass(frozen=True)
class StackedExperts:
    """A tensor of this naming holding every routed expert of a layer: [E, parts * rows, cols].

    Expert e's official tensors are the `parts` row blocks of slice e, in order.
    """

    name: str
    official: tuple[str, ...]


@dataclass(frozen=True)
class HFNaming:
    """One Hugging Face naming, as differences from the official names."""

    name: str
    top: Mapping[str, str]
    """official top-level name -> this naming's name."""
    layer_prefix: str
    block: Mapping[str, str] = field(default_factory=dict)
    """official per-layer suffix -> this naming's suffix; suffixes not listed are the same."""
    stacked_experts: tuple[StackedExperts, ...] = ()
    prefix: str = ""
    """Put before every name of this naming."""
    carries_other_parts: bool = False
    """Tensors outside the text model's names (no `prefix`, or not an official top-level part after it) are
    other parts of the release, carried unchanged."""


OFFICIAL_NAMING = HFNaming(
    name=OFFICIAL,
    top={},
    layer_prefix=OFFICIAL_LAYER_PREFIX,
)

TRANSFORMERS_SAVED_NAMING = HFNaming(
    name=TRANSFORMERS_SAVED,
    top={
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base",
        "hc_head_scale": "model.hc_head.hc_scale",
    },
    layer_prefix="model.layers.{layer}.",
    block={"attn.kv_norm.weight": "attn.norm.weight"},
)


def _module_compressor(official: str, module: str) -> dict[str, str]:
    return {
        f"{official}.wkv.weight": f"{module}.kv_proj.weight",
        f"{official}.wgate.weight": f"{module}.gate_proj.weight",
        f"{official}.ape": f"{module}.position_bias",
        f"{official}.norm.weight": f"{module}.kv_norm.weight",
    }


TRANSFORMERS_MODULE_NAMING = HFNaming(
    name=TRANSFORMERS_MODULE,
    top={
        "embed.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base",
        "hc_head_scale": "model.hc_head.hc_scale",
    },
    layer_prefix="model.layers.{layer}.",
    block={
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "hc_attn_fn": "attn_hc.fn",
        "hc_attn_base": "attn_hc.base",
        "hc_attn_scale": "attn_hc.scale",
        "hc_ffn_fn": "ffn_hc.fn",
        "hc_ffn_base": "ffn_hc.base",
        "hc_ffn_scale": "ffn_hc.scale",
        "attn.attn_sink": "self_attn.sinks",
        "attn.wq_a.weight": "self_attn.q_a_proj.weight",
        "attn.q_norm.weight": "self_attn.q_a_norm.weight",
        "attn.wq_b.weight": "self_attn.q_b_proj.weight",
        "attn.wkv.weight": "self_attn.kv_proj.weight",
        "attn.kv_norm.weight": "self_attn.kv_norm.weight",
        "attn.wo_a.weight": "self_attn.o_a_proj.weight",
        "attn.wo_b.weight": "self_attn.o_b_proj.weight",
        **_module_compressor("attn.compressor", "self_attn.compressor"),
        **_module_compressor("attn.indexer.compressor", "self_attn.compressor.indexer"),
        "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
        "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
        "ffn.gate.weight": "mlp.gate.weight",
        "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
        "ffn.gate.tid2eid": "mlp.gate.tid2eid",
        "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
        "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    },
    stacked_experts=(
        StackedExperts(
            "mlp.experts.gate_up_proj", ("ffn.experts.{expert}.w1.weight", "ffn.experts.{expert}.w3.weight")
        ),
        StackedExperts("mlp.experts.down_proj", ("ffn.experts.{expert}.w2.weight",)),
    ),
)

OFFICIAL_MODEL_PREFIX_NAMING = HFNaming(
    name=OFFICIAL_MODEL_PREFIX,
    top={},
    layer_prefix=OFFICIAL_LAYER_PREFIX,
    prefix="model.",
    carries_other_parts=True,
)

# In detection order: a prefixed naming that carries other parts is tried last.
NAMINGS = {n.name: n for n in (OFFICIAL_NAMING, TRANSFORMERS_SAVED_NAMING, TRANSFORMERS_MODULE_NAMING,
                               OFFICIAL_MODEL_PREFIX_NAMING)}


def _official_name_sets() -> tuple[list[str], list[str], list[str]]:
    """(top-level, per-layer suffix, MTP suffix) official templates, read off the Megatron-Core rules."""
    top, block, mtp = [], [], []
    for template in MCoreNaming().official_templates():
        if template.startswith(OFFICIAL_LAYER_PREFIX):
            block.append(template[len(OFFICIAL_LAYER_PREFIX):])
        elif template.startswith(MTP_PREFIX):
            mtp.append(template[len(MTP_PREFIX):])
        else:
            top.append(template)
    return top, block, mtp


class HFNameTranslator:
    """Translates one naming's tensors to and from official names."""

    def __init__(self, naming: HFNaming):
        self.naming = naming
        top, block, mtp = _official_name_sets()
        stacked_parts = {part for s in naming.stacked_experts for part in s.official}
        pairs = [(name, naming.top.get(name, name)) for name in top]
        pairs += [
            (OFFICIAL_LAYER_PREFIX + suffix, naming.layer_prefix + naming.block.get(suffix, suffix))
            for suffix in block
            if suffix not in stacked_parts
        ]
        pairs += [(MTP_PREFIX + suffix, MTP_PREFIX + suffix) for suffix in mtp]
        pairs = [(official, naming.prefix + theirs) for official, theirs in pairs]
        self._text_parts = {official.split(".")[0] for official, _ in pairs}
        self._to_official = TemplateIndex((theirs, official) for official, theirs in pairs)
        self._to_naming = TemplateIndex(pairs)
        self._stacked_from_naming = TemplateIndex(
            (naming.prefix + naming.layer_prefix + s.name, s) for s in naming.stacked_experts
        )
        self._stacked_from_official = TemplateIndex(
            (OFFICIAL_LAYER_PREFIX + part, (s, i)) for s in naming.stacked_experts for i, part in enumerate(s.official)
        )

    def knows(self, name: str) -> bool:
        return self._to_official.match(name) is not None or self._stacked_from_naming.match(name) is not None

    def carries(self, name: str) -> bool:
        """Whether `name` belongs to another part of the release than the text model (see `HFNaming`)."""
        if not self.naming.carries_other_parts:
            return False
        prefix = self.naming.prefix
        return not (name.startswith(prefix) and name[len(prefix):].split(".")[0] in self._text_parts)

    def to_official(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Rename a stream of this naming's tensors to official names (unstacking stacked experts)."""
        for name, tensor in items:
            found = self._to_official.match(name)
            if found is not None:
                official, values = found
                yield Template(official).format(values), tensor
                continue
            stacked = self._stacked_from_naming.match(name)
            if stacked is None:
                raise UnknownTensorError(
                    f"tensor {name!r} is not a DeepSeek-V4 tensor of the {self.naming.name!r} naming"
                )
            spec, values = stacked
            yield from _unstack(spec, values, tensor)

    def from_official(
        self, items: Iterable[tuple[str, torch.Tensor]], num_experts: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Rename a stream of official tensors to this naming (stacking experts needs `num_experts`)."""
        pending: dict[tuple[str, int], dict[tuple[int, int], torch.Tensor]] = {}
        for name, tensor in items:
            found = self._to_naming.match(name)
            if found is not None:
                theirs, values = found
                yield Template(theirs).format(values), tensor
                continue
            stacked = self._stacked_from_official.match(name)
            if stacked is None:
                raise UnknownTensorError(f"official tensor {name!r} has no {self.naming.name!r} name")
            (spec, part), values = stacked
            if num_experts is None:
                raise ValueError(f"the {self.naming.name!r} naming stacks experts: pass num_experts")
            parts = pending.setdefault((spec.name, values["layer"]), {})
            parts[(values["expert"], part)] = tensor
            if len(parts) == num_experts * len(spec.official):
                del pending[(spec.name, values["layer"])]
                stacked_name = self.naming.prefix + self.naming.layer_prefix + spec.name
                yield Template(stacked_name).format(values), _stack(spec, parts, num_experts)
        if pending:
            (stacked, layer), parts = next(iter(pending.items()))
            raise ValueError(
                f"layer {layer} {stacked}: got {len(parts)} of the expert tensors it stacks; "
                f"the checkpoint lacks some experts (expected {num_experts})"
            )


def _unstack(spec: StackedExperts, values: dict[str, int], tensor: torch.Tensor):
    for expert in range(tensor.shape[0]):
        for part, rows in zip(spec.official, tensor[expert].chunk(len(spec.official), dim=0)):
            yield Template(OFFICIAL_LAYER_PREFIX + part).format({**values, "expert": expert}), rows


def _stack(spec: StackedExperts, parts: dict[tuple[int, int], torch.Tensor], num_experts: int) -> torch.Tensor:
    per_expert = [torch.cat([parts[(e, p)] for p in range(len(spec.official))], dim=0) for e in range(num_experts)]
    return torch.stack(per_expert, dim=0)


TRANSLATORS = {name: HFNameTranslator(naming) for name, naming in NAMINGS.items()}


def detect_naming(names: Iterable[str]) -> str:
    """Which naming a checkpoint's tensor names follow; an unknown name raises, naming it."""
    names = list(names)
    if not names:
        raise ValueError("no tensors: cannot tell which DeepSeek-V4 naming the checkpoint uses")
    unknown_counts = {}
    for naming, translator in TRANSLATORS.items():
        known = {n for n in names if translator.knows(n)}
        # a naming that carries other parts needs some text tensors to be the checkpoint's naming
        unknown = [n for n in names if n not in known and not translator.carries(n)] if known else names
        if not unknown:
            return naming
        unknown_counts[naming] = unknown
    closest = min(unknown_counts, key=lambda n: len(unknown_counts[n]))
    raise UnknownTensorError(
        f"tensor {unknown_counts[closest][0]!r} is not a DeepSeek-V4 tensor name; the checkpoint is closest "
        f"to the {closest!r} naming ({len(unknown_counts[closest])} of {len(names)} names unknown to it)"
    )
