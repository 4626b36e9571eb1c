"""Tiny random DeepSeek-V4 checkpoints, for tests and examples.

The model is a real `transformers.DeepseekV4ForCausalLM` whose every tensor is
filled with non-trivial random values (no zero biases, sinks or `ape`, no
identity hyper-connections), with all three attention kinds (ratios 0, 4, 128),
hash-routed layers, several output groups and 16 indexer heads. transformers
builds no MTP layer, so the official naming gets synthesised MTP tensors.

Every tiny checkpoint has a tokenizer that fits its 128-token vocabulary: one token per printable
ASCII character, DeepSeek's special tokens, and DeepSeek-V4's chat mode as its chat template
(`deepseek_v4_chat.jinja`), so chat data can be rendered offline.

`quantised=True` stores the official naming the way the released checkpoints do:
FP8 e4m3 with block scales for the attention and shared-expert projections, FP4
e2m1 with E8M0 scales per 32 inputs for the routed experts, the other weights in
bf16 and the hyper-connection, sink, `ape` and gate-bias tensors in fp32. Some
blocks get a scale twice the smallest sufficient one (as when a block's largest
value was rounded down), so that re-quantising by amax alone cannot reproduce them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable

import torch

from bridge.hf_config import DeepSeekV4HFConfig, YarnScaling, transformers_config, write_official_config
from bridge.hf_naming import OFFICIAL, TRANSFORMERS_MODULE, TRANSFORMERS_SAVED, TRANSLATORS
from bridge.quantisation import (
    DEFAULT_FP8_BLOCK,
    E8M0,
    FP4,
    FP4_GROUP,
    FP4_WEIGHTS,
    FP8,
    FP8_WEIGHTS,
    SourceFormat,
    release_plain_format,
    quantise_with_scale,
    requantise,
)
from bridge.safetensors_io import write_safetensors

TINY = DeepSeekV4HFConfig(
    vocab_size=128,
    hidden_size=64,
    num_layers=4,
    num_attention_heads=4,
    head_dim=32,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    sliding_window=8,
    compress_ratios=(0, 4, 128, 4),
    index_n_heads=16,
    index_head_dim=16,
    index_topk=4,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    yarn=YarnScaling(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0),
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    num_routed_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=32,
    routed_scaling_factor=1.5,
    num_hash_layers=2,
    swiglu_limit=10.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    num_nextn_predict_layers=1,
    dtype="float32",
)


def tiny_config(**changes) -> DeepSeekV4HFConfig:
    """The tiny architecture, with any field changed."""
    if "compress_ratios" in changes:
        changes["compress_ratios"] = tuple(changes["compress_ratios"])
    return dataclasses.replace(TINY, **changes)


# --- random values, by tensor kind (matched on the official name's end) ----------------------------
def _near_one(shape, g):
    return 1.0 + 0.1 * torch.randn(shape, generator=g)


def _scaled(std: float) -> Callable:
    return lambda shape, g: std * torch.randn(shape, generator=g)


def _fan_in(shape, g):
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])


def _positive_scale(shape, g):
    return 0.5 + torch.rand(shape, generator=g)


RANDOM_VALUES: list[tuple[str, Callable]] = [
    (r"norm\.weight$", _near_one),
    (r"hc_\w+_fn$", _scaled(0.1)),
    (r"hc_\w+_base$", _scaled(0.5)),
    (r"hc_\w+_scale$", _positive_scale),
    (r"attn_sink$", _scaled(1.0)),
    (r"\.ape$", _scaled(0.5)),
    (r"gate\.bias$", _scaled(0.1)),
    (r"^embed\.weight$", _scaled(1.0)),
    (r"\.weight$", _fan_in),
]


def _random_like(name: str, tensor: torch.Tensor, g: torch.Generator, num_experts: int) -> torch.Tensor:
    if name.endswith("tid2eid"):
        k = tensor.shape[1]
        rows = [torch.randperm(num_experts, generator=g)[:k] for _ in range(tensor.shape[0])]
        return torch.stack(rows).to(tensor.dtype)
    for pattern, make in RANDOM_VALUES:
        if re.search(pattern, name):
            return make(tuple(tensor.shape), g).to(tensor.dtype)
    raise KeyError(f"tiny.py has no random-value rule for {name!r}; add one to RANDOM_VALUES")


def randomise_official(state: dict[str, torch.Tensor], seed: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Fresh random values of the same shapes for a dict of official-named tensors."""
    g = torch.Generator().manual_seed(seed)
    return {name: _random_like(name, t, g, num_experts) for name, t in state.items()}


# --- model and MTP -------------------------------------------------------------------------------
def make_tiny_model(cfg: DeepSeekV4HFConfig = TINY, seed: int = 0):
    """A `DeepseekV4ForCausalLM` of `cfg` with random non-trivial weights (fp32, eval mode)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(transformers_config(cfg)).eval()
    translator = TRANSLATORS[TRANSFORMERS_MODULE]
    official = dict(translator.to_official(model.state_dict().items()))
    random = randomise_official(official, seed, cfg.num_routed_experts)
    stacked = dict(translator.from_official(random.items(), num_experts=cfg.num_routed_experts))
    model.load_state_dict(stacked, strict=True)
    return model


def make_tiny_mtp(cfg: DeepSeekV4HFConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official `mtp.{k}.*` tensors for `cfg.num_nextn_predict_layers` MTP layers (sliding, not hash-routed)."""
    from transformers import DeepseekV4ForCausalLM

    block_cfg = dataclasses.replace(cfg, num_layers=1, compress_ratios=(0,), num_hash_layers=0)
    block = DeepseekV4ForCausalLM(transformers_config(block_cfg))
    block_official = dict(TRANSLATORS[TRANSFORMERS_MODULE].to_official(block.state_dict().items()))
    d, n = cfg.hidden_size, cfg.hc_mult
    shapes = {
        "enorm.weight": (d,),
        "hnorm.weight": (d,),
        "e_proj.weight": (d, d),
        "h_proj.weight": (d, d),
        "norm.weight": (d,),
        "hc_head_fn": (n, n * d),
        "hc_head_base": (n,),
        "hc_head_scale": (1,),
    }
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        templates = {f"mtp.{k}.{name}": torch.empty(shape) for name, shape in shapes.items()}
        block_prefix = "layers.0."
        templates.update(
            {f"mtp.{k}.{name.removeprefix(block_prefix)}": t
             for name, t in block_official.items() if name.startswith(block_prefix)}
        )
        out.update(randomise_official(templates, seed + 1000 + k, cfg.num_routed_experts))
    return out


# --- tokenizer ----------------------------------------------------------------------------------
CHAT_TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepseek_v4_chat.jinja")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = ["<unk>", BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
"""DeepSeek's spelling (full-width bars, U+2581 for spaces), as the released tokenizers have them."""


def tiny_tokenizer():
    """A `PreTrainedTokenizerFast` of the special tokens and one token per character of "\\n" and printable
    ASCII (103 tokens, below the tiny vocabulary), with DeepSeek-V4's chat mode as its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    # BPE without merges: each character is a token.
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    model.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    model.decoder = decoders.Fuse()
    with open(CHAT_TEMPLATE_FILE, encoding="utf-8") as f:
        template = f.read()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=BOS, eos_token=EOS, unk_token="<unk>", pad_token=EOS,
        chat_template=template,
    )


# --- quantised storage like the released checkpoints ---------------------------------------------
def _quantised_like_release(weight: torch.Tensor, fmt: SourceFormat, g: torch.Generator):
    """(stored weight, scale): amax scales, a quarter of the blocks' scales doubled."""
    _, scale, _ = requantise(weight, fmt)
    doubled = torch.rand(scale.shape, generator=g) < 0.25
    if scale.dtype == E8M0:
        bits = scale.view(torch.uint8)
        scale = torch.where(doubled, bits + 1, bits).view(E8M0)
    else:
        scale = torch.where(doubled, scale * 2, scale)
    return quantise_with_scale(weight, fmt, scale), scale


def quantise_like_release(
    state: dict[str, torch.Tensor], seed: int, fp8_block=DEFAULT_FP8_BLOCK, fp8_scale_dtype: torch.dtype = E8M0
) -> dict[str, torch.Tensor]:
    """Official-named tensors stored as in the released checkpoints (see the module docstring)."""
    g = torch.Generator().manual_seed(seed + 7)
    out = {}
    for name, tensor in state.items():
        if re.search(FP4_WEIGHTS, name):
            fmt = SourceFormat("int8", FP4, "float8_e8m0fnu", (1, FP4_GROUP))
        elif re.search(FP8_WEIGHTS, name):
            fmt = SourceFormat("float8_e4m3fn", FP8, str(fp8_scale_dtype).removeprefix("torch."), tuple(fp8_block))
        else:
            out[name] = tensor.to(release_plain_format(name, tensor.dtype).torch_dtype)
            continue
        out[name], out[name.removesuffix(".weight") + ".scale"] = _quantised_like_release(tensor, fmt, g)
    return out


def make_tiny_checkpoint(
    out_dir: str | os.PathLike,
    naming: str = OFFICIAL,
    seed: int = 0,
    cfg: DeepSeekV4HFConfig = TINY,
    with_mtp: bool | None = None,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantised: bool = False,
    fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    fp8_scale_dtype: torch.dtype = E8M0,
) -> str:
    """Write a random tiny DeepSeek-V4 checkpoint (safetensors + config.json) in one of the three namings.

    `official`: official names and config (with MTP tensors unless `with_mtp=False`).
    `transformers-saved`: transformers' own `save_pretrained` (no MTP: transformers has none).
    `transformers-module`: the in-memory `state_dict()` names, transformers config.
    `max_shard_bytes` splits the weights over several files plus an index.
    `quantised` (official naming only) stores FP8/FP4 tensors as the released checkpoints do,
    FP8 with `fp8_block` blocks and `fp8_scale_dtype` (E8M0 or fp32) scales.
    Returns `out_dir`.
    """
    if quantised and naming != OFFICIAL:
        raise ValueError("quantised tiny checkpoints use the official naming only (like the released ones)")
    out_dir = os.fspath(out_dir)
    model = make_tiny_model(cfg, seed).to(dtype)
    with_mtp = (naming == OFFICIAL) if with_mtp is None else with_mtp
    if naming == TRANSFORMERS_SAVED:
        if with_mtp:
            raise ValueError("transformers' save_pretrained writes no MTP tensors; use with_mtp=False")
        shard = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
        model.save_pretrained(out_dir, **shard)
        tiny_tokenizer().save_pretrained(out_dir)
        return out_dir
    state = dict(model.state_dict())
    if naming == OFFICIAL:
        state = dict(TRANSLATORS[TRANSFORMERS_MODULE].to_official(state.items()))
        written = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."))
        if quantised:
            quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(fp8_block),
                     "scale_fmt": "ue8m0" if fp8_scale_dtype == E8M0 else "float32"}
            written = dataclasses.replace(written, dtype="bfloat16", quantization_config=quant, expert_dtype="fp4")
        write_official_config(written, out_dir)
    elif naming == TRANSFORMERS_MODULE:
        model.config.save_pretrained(out_dir)
    else:
        raise ValueError(
            f"unknown naming {naming!r}; use {OFFICIAL!r}, {TRANSFORMERS_SAVED!r} or {TRANSFORMERS_MODULE!r}"
        )
    if with_mtp:
        state.update({k: v.to(dtype) for k, v in make_tiny_mtp(cfg, seed).items()})
    if quantised:
        state = quantise_like_release(state, seed, fp8_block, fp8_scale_dtype)
    write_safetensors(state.items(), out_dir, max_shard_bytes=max_shard_bytes)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


# --- release-sized checkpoints, streamed -----------------------------------------------------------
def official_shapes(cfg: DeepSeekV4HFConfig) -> dict[str, torch.Size]:
    """Every official tensor name of `cfg`'s text model and its logical shape (no MTP), from transformers'
    model built on the meta device."""
    from transformers import DeepseekV4ForCausalLM

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(transformers_config(cfg))
    official = TRANSLATORS[TRANSFORMERS_MODULE].to_official(model.state_dict().items())
    return {name: tensor for name, tensor in official}


def _random_e8m0(shape, exponent: int, g: torch.Generator) -> torch.Tensor:
    """E8M0 scales 2^(exponent-1) .. 2^(exponent+1), so neighbouring blocks differ."""
    return (127 + exponent + torch.randint(-1, 2, shape, generator=g)).to(torch.uint8).view(E8M0)


def _random_stored(name: str, meta: torch.Tensor, g: torch.Generator, fp8_block, num_experts: int):
    """[(name, tensor)] of one official tensor stored as the release stores it, values of a trained model's
    magnitude (std about 1/sqrt(fan-in)) drawn directly as codes, without quantising anything."""
    if re.search(FP4_WEIGHTS, name):
        rows, cols = meta.shape
        packed = torch.randint(-128, 128, (rows, cols // 2), generator=g, dtype=torch.int8)
        # uniform e2m1 codes have std 2.9
        exponent = -round(math.log2(2.9 * math.sqrt(cols)))
        return [(name, packed), (name.removesuffix(".weight") + ".scale",
                                 _random_e8m0((rows, cols // FP4_GROUP), exponent, g))]
    if re.search(FP8_WEIGHTS, name):
        rows, cols = meta.shape
        # e4m3 codes with exponents up to 8 (|value| <= 3.75, std about 1), either sign
        codes = torch.randint(0, 72, (rows, cols), generator=g, dtype=torch.uint8)
        codes |= torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.uint8) << 7
        blocks = (-(-rows // fp8_block[0]), -(-cols // fp8_block[1]))
        return [(name, codes.view(torch.float8_e4m3fn)), (name.removesuffix(".weight") + ".scale",
                _random_e8m0(blocks, -round(math.log2(math.sqrt(cols))), g))]
    values = _random_like(name, meta, g, num_experts)
    return [(name, values.to(release_plain_format(name, values.dtype).torch_dtype))]


def write_release_like_checkpoint(out_dir: str | os.PathLike, cfg: DeepSeekV4HFConfig, seed: int = 0,
                                  max_shard_bytes: int | None = None) -> str:
    """A random checkpoint of architecture `cfg` in the released formats (FP8 attention and shared experts with
    128x128 E8M0 block scales, FP4 routed experts, bf16/fp32 elsewhere; no MTP), written one tensor at a
    time, so any size fits in memory. Returns `out_dir`."""
    out_dir = os.fspath(out_dir)
    fp8_block = DEFAULT_FP8_BLOCK
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(fp8_block), "scale_fmt": "ue8m0"}
    g = torch.Generator().manual_seed(seed)

    def tensors():
        for name, meta in official_shapes(cfg).items():
            yield from _random_stored(name, meta, g, fp8_block, cfg.num_routed_experts)

    write_safetensors(tensors(), out_dir, max_shard_bytes=max_shard_bytes)
    write_official_config(dataclasses.replace(cfg, dtype="bfloat16", quantization_config=quant, expert_dtype="fp4",
                                              num_nextn_predict_layers=0), out_dir)
    return out_dir
