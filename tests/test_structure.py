"""The package layers, the Megatron-Core hooks the model relies on, and refused config overrides.

Layers (imports point downwards only):
- the model: `megatron_v4/*.py` (config, rope, norm, hyper_connection, compressor, indexer,
  attention, router, moe, layer, mtp, model, specs, decode_state), importing only itself;
- the runtime: `megatron_v4/runtime/` (process groups, CPU patches, rank harness), importing
  nothing of ours: the bridge and the tools both set up Megatron-Core with it;
- the bridge: `bridge/`, importing the model and the runtime;
- the tools: `megatron_v4/training/`, `megatron_v4/inference/`, importing anything below.
No module imports one of ours inside a function (an import hidden to dodge a cycle), except the
command-line entry points, which import the heavy modules after checking their arguments.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_v4.config import DeepSeekV4TransformerConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = ("megatron_v4", "bridge")
ENTRY_POINTS = {"bridge.cli", "bridge.slice_command"}
"""Modules that import PyTorch-heavy modules of ours only after checking the command line."""


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "bridge":
        return "bridge"
    if len(parts) > 1 and parts[1] in ("runtime", "training", "inference"):
        return parts[1]
    return "facade" if module == "megatron_v4" else "model"


ALLOWED = {
    "model": {"model"},
    "runtime": {"runtime"},
    "bridge": {"bridge", "model", "runtime"},
    "inference": {"inference", "model", "runtime", "bridge"},
    "training": {"training", "inference", "model", "runtime", "bridge"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _project_imports(path: pathlib.Path):
    """(imported module, inside a function?) for every import of one of our packages."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                yield name, id(node) in nested


def test_layers_import_downwards_only():
    modules = _modules()
    assert {"megatron_v4.attention", "megatron_v4.runtime.parallel", "bridge.cli"} <= modules.keys()
    violations = []
    for module, path in modules.items():
        layer = _layer(module)
        if layer == "facade":
            continue
        for imported, in_function in _project_imports(path):
            target = max((m for m in modules if imported == m or imported.startswith(m + ".")), key=len)
            target_layer = _layer(target)
            if target_layer == "facade" or target_layer not in ALLOWED[layer]:
                violations.append(f"{module} ({layer}) imports {imported} ({target_layer})")
            if in_function and module not in ENTRY_POINTS:
                violations.append(f"{module} imports {imported} inside a function")
    assert not violations, "\n".join(violations)


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_megatron_core_moe_hooks_keep_the_signatures_we_override():
    """`DeepSeekV4MoELayer` keeps MoELayer.forward and overrides `route`; `HashRouter.forward` is
    called like Megatron-Core's router. A Megatron-Core release that changes these breaks us."""
    empty = inspect.Parameter.empty
    assert _parameters(MoELayer.forward) == [
        ("self", empty),
        ("hidden_states", empty),
        ("intermediate_tensors", None),
        ("padding_mask", None),
    ]
    assert _parameters(MoELayer.route) == [("self", empty), ("hidden_states", empty), ("padding_mask", None)]
    assert _parameters(TopKRouter.forward) == [("self", empty), ("input", empty), ("padding_mask", None)]
    source = inspect.getsource(MoELayer.forward)
    assert "self.route(hidden_states, padding_mask)" in source
    assert "if self.moe_layer_recompute and self.training:" in source


TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    kv_channels=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    o_groups=2,
    o_lora_rank=8,
    compress_ratios=[0, 4],
    index_n_heads=16,
    index_head_dim=8,
    num_hash_layers=1,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    vocab_size=64,
    use_cpu_initialization=True,
)


def test_config_defaults_are_deepseek_v4():
    config = DeepSeekV4TransformerConfig(**TINY)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and config.activation_func is F.silu
    assert config.moe_router_score_function == "sqrtsoftplus" and config.moe_router_enable_expert_bias
    assert config.activation_func_clamp_value == config.swiglu_limit == 10.0


@pytest.mark.parametrize(
    "override, message",
    [
        ({"normalization": "LayerNorm"}, "normalization='LayerNorm': DeepSeek-V4 uses normalization='RMSNorm'"),
        ({"activation_func": F.gelu}, "activation_func=.*DeepSeek-V4 uses activation_func"),
        ({"add_bias_linear": True}, "add_bias_linear=True"),
        ({"moe_router_score_function": "softmax"}, "moe_router_score_function='softmax'"),
        ({"moe_router_enable_expert_bias": False}, "moe_router_enable_expert_bias=False"),
        ({"activation_func_clamp_value": 3.0}, "activation_func_clamp_value=3.0 disagrees with swiglu_limit"),
        (
            {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
            r"recompute_modules \['core_attn'\] name Megatron-Core modules",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:If you are using transformer_engine")
def test_config_refuses_to_override_an_explicit_choice(override, message):
    with pytest.raises(ValueError, match=message):
        DeepSeekV4TransformerConfig(**TINY, **override)
