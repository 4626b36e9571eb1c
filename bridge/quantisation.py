"""The released checkpoints' FP8 and FP4 weight formats: dequantisation and exact re-quantisation.

- FP8: a float8_e4m3fn weight plus `<name>.scale`, one scale per 128x128 block
  (partial blocks at the edges), stored as E8M0 (a power of two, 2^(e-127)) or fp32.
  W = fp8 * scale.
- FP4 (routed experts): an int8 weight holding two e2m1 codes per byte, low nibble
  first, plus an E8M0 `<name>.scale` per 32 consecutive inputs of a row.

Re-quantising by amax alone does not give back the original bytes: a block whose
largest value was rounded down can get a smaller scale the second time. So the
importer keeps every original scale, and `requantise` first tries each block with
its original scale; a block that reproduces its dequantised values exactly under it
keeps it (same bytes), and only a block that does not (the weights changed) gets a
fresh amax scale.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass

import torch

FP8 = "fp8"
FP4 = "fp4"
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GROUP = 32
DEFAULT_FP8_BLOCK = (128, 128)
E8M0 = torch.float8_e8m0fnu
SCALE_SUFFIX = ".scale"
WEIGHT_SUFFIX = ".weight"
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
"""e2m1 code (0..15; bit 3 is the sign) -> value."""


class QuantisationError(ValueError):
    """A quantised tensor whose weight and scale do not fit together."""


@dataclass(frozen=True)
class SourceFormat:
    """How one official tensor was stored in the source checkpoint."""

    dtype: str
    """The stored weight's dtype (`float8_e4m3fn`, `int8` for FP4, `bfloat16`, ...)."""
    quant: str | None = None
    """`fp8`, `fp4` or None."""
    scale_dtype: str | None = None
    """`float8_e8m0fnu` or `float32`."""
    block: tuple[int, int] | None = None
    """Elements per scale: (rows, cols) of a block; FP4 is (1, 32)."""

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> SourceFormat:
        block = d.get("block")
        return cls(d["dtype"], d.get("quant"), d.get("scale_dtype"), tuple(block) if block else None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# How the released checkpoints store each official tensor (the DeepSeek-V4 releases' safetensors).
FP8_WEIGHTS = r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|shared_experts\.w[123])\.weight$"
FP4_WEIGHTS = r"\.experts\.\d+\.w[123]\.weight$"
FP32_TENSORS = r"(hc_\w+_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$"


def release_plain_format(name: str, dtype: torch.dtype = torch.bfloat16) -> SourceFormat:
    """The unquantised format the releases give tensor `name`: fp32 for the mHC, sink, ape and gate-bias
    tensors, integers as they are (`tid2eid`), bf16 for everything else (FP8/FP4 weights included)."""
    if not dtype.is_floating_point:
        return SourceFormat(dtype_name(dtype))
    return SourceFormat("float32" if re.search(FP32_TENSORS, name) else "bfloat16")


def scale_name(weight_name: str) -> str:
    """`layers.0.attn.wq_a.weight` -> `layers.0.attn.wq_a.scale` (where the released checkpoints keep it)."""
    return weight_name.removesuffix(WEIGHT_SUFFIX) + SCALE_SUFFIX


def scale_companions(names) -> set[str]:
    """The names among `names` that are the scale of another one (`X.scale` beside `X.weight`)."""
    names = set(names)
    return {n for n in names if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) + WEIGHT_SUFFIX in names}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_format(name: str, weight: torch.Tensor, scale: torch.Tensor | None, fp8_block=DEFAULT_FP8_BLOCK):
    """The format of a stored tensor (and its scale, if it has one); raises if the pair is inconsistent."""
    if scale is None:
        if weight.dtype == torch.float8_e4m3fn or weight.dtype == torch.int8:
            raise QuantisationError(f"tensor {name!r} is {dtype_name(weight.dtype)} but the checkpoint has no scale for it")
        return SourceFormat(dtype_name(weight.dtype))
    if scale.dtype not in (E8M0, torch.float32):
        raise QuantisationError(f"scale of {name!r} is {dtype_name(scale.dtype)}; expected float8_e8m0fnu or float32")
    if weight.dim() != 2:
        raise QuantisationError(f"quantised tensor {name!r} has {weight.dim()} dims; expected a 2-d weight")
    rows, cols = weight.shape
    if weight.dtype == torch.float8_e4m3fn:
        block = tuple(fp8_block)
        expected = (-(-rows // block[0]), -(-cols // block[1]))
        fmt = SourceFormat(dtype_name(weight.dtype), FP8, dtype_name(scale.dtype), block)
    elif weight.dtype in (torch.int8, torch.uint8):
        if scale.dtype != E8M0:
            raise QuantisationError(f"FP4 tensor {name!r} has a {dtype_name(scale.dtype)} scale; FP4 uses E8M0")
        if (2 * cols) % FP4_GROUP:
            raise QuantisationError(f"FP4 tensor {name!r} has {2 * cols} inputs, not a multiple of {FP4_GROUP}")
        expected = (rows, 2 * cols // FP4_GROUP)
        fmt = SourceFormat(dtype_name(weight.dtype), FP4, dtype_name(scale.dtype), (1, FP4_GROUP))
    else:
        raise QuantisationError(
            f"tensor {name!r} has a scale but is {dtype_name(weight.dtype)}; FP8 weights are float8_e4m3fn, FP4 int8"
        )
    if tuple(scale.shape) != expected:
        raise QuantisationError(
            f"scale of {name!r} has shape {tuple(scale.shape)}; a {tuple(weight.shape)} {fmt.quant} weight "
            f"needs {expected}"
        )
    return fmt


# --- scales -----------------------------------------------------------------------------------------
def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp32 numbers (E8M0 exponent e -> 2^(e-127))."""
    return scale.to(torch.float32)


def _expand(per_block: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Repeat a per-block tensor over its blocks, cut to the weight's shape (a broadcast view where blocks tile)."""
    rows, cols = shape
    if rows % block[0] == 0 and cols % block[1] == 0:
        grid = per_block[:, None, :, None].expand(per_block.shape[0], block[0], per_block.shape[1], block[1])
        return grid.reshape(rows, cols) if block[0] > 1 else grid.expand(-1, 1, -1, block[1]).reshape(rows, cols)
    full = per_block.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def _block_reduce(values: torch.Tensor, block: tuple[int, int], reduce, pad: float = 0.0) -> torch.Tensor:
    """Reduce each block of a 2-d tensor (partial edge blocks padded with `pad`)."""
    rows, cols = values.shape
    br, bc = block
    padded = torch.nn.functional.pad(values, (0, -cols % bc, 0, -rows % br), value=pad)
    blocks = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    return reduce(blocks)


def _amax(values: torch.Tensor, block) -> torch.Tensor:
    return _block_reduce(values.abs(), block, lambda b: b.amax(dim=(1, 3)))


def _fresh_scale(amax: torch.Tensor, fmt_max: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """The smallest scale that keeps the block's largest magnitude within the format (power of 2 for E8M0)."""
    ratio = torch.where(amax > 0, amax / fmt_max, torch.ones_like(amax))
    if scale_dtype == E8M0:
        return torch.exp2(torch.ceil(torch.log2(ratio))).to(E8M0)
    return ratio.to(scale_dtype)


# --- FP4 codes --------------------------------------------------------------------------------------
def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [rows, cols] -> int8 [rows, cols/2], low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value (ties to the even code), saturating at +-6.

    In units of 0.5 the magnitudes are 0,1,2,3,4 (step 1), 6,8 (step 2) and 12 (step 4);
    rounding to the step of each range with torch.round (half to even) gives the
    nearest value and, at a tie, the even code.
    """
    halves = x.abs().clamp(max=FP4_MAX) * 2
    fine, middle, coarse = torch.round(halves), torch.round(halves / 2) * 2, torch.round(halves / 4) * 4
    rounded = torch.where(halves < 4, fine, torch.where(halves < 8, middle, coarse))
    code = torch.where(rounded <= 4, rounded, torch.where(rounded <= 8, 2 + rounded / 2, torch.full_like(rounded, 7)))
    # the sign bit is kept for zeros too: -0 (code 8) is a valid stored value and must round-trip
    return (code + 8 * torch.signbit(x)).to(torch.uint8)


# --- dequantise ---------------------------------------------------------------------------------------
def _fp4_pairs() -> torch.Tensor:
    """Packed byte (0..255) -> its two values, low nibble first: [256, 2] fp32."""
    byte = torch.arange(256)
    return torch.stack((FP4_VALUES[byte & 0x0F], FP4_VALUES[byte >> 4]), dim=1)


_FP4_PAIRS = _fp4_pairs()


def _exact_dtype(scale: torch.Tensor, fmt: SourceFormat, dtype: torch.dtype) -> torch.Tensor | torch.dtype:
    """`dtype` if every dequantised value is exact in it (power-of-two scales in its range), else fp32."""
    if scale.dtype != E8M0 or dtype not in (torch.bfloat16, torch.float32) or scale.numel() == 0:
        return torch.float32
    exponents = scale.view(torch.uint8)
    smallest = int(exponents.min()) - 127 + (-9 if fmt.quant == FP8 else -1)  # e4m3 subnormal 2^-9, e2m1 0.5
    largest = int(exponents.max()) - 127 + (9 if fmt.quant == FP8 else 3)  # 448 < 2^9, 6 < 2^3
    fits = smallest >= (-133 if dtype == torch.bfloat16 else -149) and largest < 128
    return dtype if fits else torch.float32


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], in_place: bool = True):
    """values * per-block scales (through a block view where the blocks tile the tensor; in place unless
    `in_place` is False)."""
    rows, cols = values.shape
    if rows % block[0] == 0 and cols % block[1] == 0:
        blocks = values.view(rows // block[0], block[0], cols // block[1], block[1])
        if not in_place:
            return (blocks * scales[:, None, :, None]).view(rows, cols)
        blocks.mul_(scales[:, None, :, None])
        return values
    return values * _expand(scales, block, (rows, cols))


def dequantise(weight: torch.Tensor, scale: torch.Tensor, fmt: SourceFormat, dtype=torch.float32) -> torch.Tensor:
    """The values of a quantised weight, in `dtype` (computed exactly; rounded once if `dtype` cannot hold them)."""
    compute = _exact_dtype(scale, fmt, dtype)
    if fmt.quant == FP8:
        values = weight.to(compute)
    elif fmt.quant == FP4:
        index = weight.view(torch.uint8).reshape(-1).to(torch.int32)
        values = torch.index_select(_FP4_PAIRS.to(compute), 0, index).view(weight.shape[0], -1)
    else:
        raise QuantisationError(f"unknown quantisation {fmt.quant!r}")
    return _scale_blocks(values, scale_values(scale).to(compute), fmt.block).to(dtype)


# --- quantise ---------------------------------------------------------------------------------------
@functools.cache
def _fp4_bf16_table() -> torch.Tensor:
    """For every bf16 bit pattern (read as unsigned): its nearest e2m1 code, plus 16 when that code is not
    exact (one lookup gives both)."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16)
    values = torch.nan_to_num(patterns.to(torch.float32), nan=0.0)
    codes = fp4_encode(values)
    exact = _same_bits(FP4_VALUES[codes.long()].to(torch.bfloat16), patterns)
    return codes + 16 * (~exact).to(torch.uint8)


def _codes_under(weight: torch.Tensor, scale: torch.Tensor, fmt: SourceFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, exact): each value's nearest code under the given per-block scales, and whether it is exact.

    With power-of-two (E8M0) scales the division is exact in the weight's own dtype, so
    the check compares codes with the weight directly; bf16 FP4 uses a table of all
    65536 bf16 values. fp32 scales go through fp32 arithmetic.
    """
    shape = tuple(weight.shape)
    if scale.dtype == E8M0:
        scaled = _scale_blocks(weight, (1 / scale_values(scale)).to(weight.dtype), fmt.block, in_place=False)
        if fmt.quant == FP8:
            codes = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return codes, _same_bits(codes.to(weight.dtype), scaled)
        if weight.dtype == torch.bfloat16:
            index = scaled.view(torch.uint16).reshape(-1).to(torch.int32)
            del scaled
            looked_up = torch.index_select(_fp4_bf16_table(), 0, index).view(shape)
            return looked_up & 15, looked_up < 16
        codes = fp4_encode(scaled)
        return codes, _same_bits(FP4_VALUES[codes.long()].to(weight.dtype), scaled)
    per_element = _expand(scale_values(scale), fmt.block, shape)
    values = weight.to(torch.float32)
    codes = _encode(values / per_element, fmt)
    return codes, _same_bits((_decode(codes, fmt) * per_element).to(weight.dtype), weight)


def _encode(scaled: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    if fmt.quant == FP8:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return fp4_encode(scaled)


def _decode(codes: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    if fmt.quant == FP8:
        return codes.to(torch.float32)
    return FP4_VALUES[codes.long()]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (tells -0 from +0, and equal NaNs apart from none)."""
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.contiguous().view(as_int) == b.contiguous().view(as_int)


def _stored(codes: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    return codes if fmt.quant == FP8 else fp4_pack(codes)


def requantise(
    weight: torch.Tensor, fmt: SourceFormat, original_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Quantise `weight` to `fmt`; returns (stored weight, scale, number of blocks that needed a fresh scale).

    A block keeps its `original_scale` when quantising under it gives back exactly
    `weight`'s values (in `weight`'s dtype): then the stored bytes are the original
    ones. Otherwise the block gets the smallest scale that holds its amax.
    """
    scale_dtype = getattr(torch, fmt.scale_dtype)
    fmt_max = FP8_MAX if fmt.quant == FP8 else FP4_MAX
    if original_scale is not None:
        original = original_scale.to(scale_dtype)
        codes, exact = _codes_under(weight, original, fmt)
        if bool(exact.all()):
            return _stored(codes, fmt), original, 0
        keep = _block_reduce(exact.to(torch.float32), fmt.block, lambda b: b.amin(dim=(1, 3)), pad=1.0) > 0
        del codes, exact
    fresh = _fresh_scale(_amax(weight.to(torch.float32), fmt.block), fmt_max, scale_dtype)
    if original_scale is None:
        return quantise_with_scale(weight, fmt, fresh), fresh, fresh.numel()
    if tuple(original.shape) != tuple(fresh.shape):
        raise QuantisationError(f"original scale of shape {tuple(original.shape)}; expected {tuple(fresh.shape)}")
    as_bits = (lambda t: t.view(torch.uint8)) if scale_dtype == E8M0 else (lambda t: t)
    scale = torch.where(keep, as_bits(original), as_bits(fresh))
    scale = scale.view(E8M0) if scale_dtype == E8M0 else scale
    return quantise_with_scale(weight, fmt, scale), scale, int((~keep).sum())


def quantise_with_scale(weight: torch.Tensor, fmt: SourceFormat, scale: torch.Tensor) -> torch.Tensor:
    """The stored weight (float8 codes, or packed FP4) of `weight` under the given per-block scales."""
    return _stored(_codes_under(weight, scale, fmt)[0], fmt)
