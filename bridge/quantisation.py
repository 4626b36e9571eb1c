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

from dataclasses import asdict, dataclass

import torch

FP8 = "fp8"
FP4 = "fp4"
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GROUP = 32
DEFAULT_FP8_BLOCK = (128, 128)
E8M0 = torch.float8_e8m0fnu
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
"""e2m1 code (0..15; bit 3 is the sign) -> value."""
_FP4_MIDPOINTS = (FP4_VALUES[1:8] + FP4_VALUES[0:7]) / 2


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
    """Repeat a per-block tensor over its blocks, cut to the weight's shape."""
    full = per_block.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


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
def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols/2] -> e2m1 codes uint8 [rows, cols], low nibble first."""
    raw = packed.view(torch.uint8)
    return torch.stack((raw & 0x0F, raw >> 4), dim=-1).flatten(-2)


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [rows, cols] -> int8 [rows, cols/2], low nibble first."""
    pairs = codes.view(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value (ties to the even code), saturating at +-6."""
    magnitude = x.abs().clamp(max=FP4_MAX)
    code = torch.bucketize(magnitude, _FP4_MIDPOINTS.to(x.dtype))
    at_midpoint = magnitude == _FP4_MIDPOINTS.to(x.dtype)[code.clamp(max=6)]
    code = code + (at_midpoint & (code % 2 == 1)).to(code.dtype)
    negative = torch.signbit(x) & (code > 0)
    return (code + 8 * negative.to(code.dtype)).to(torch.uint8)


# --- dequantise ---------------------------------------------------------------------------------------
def dequantise(weight: torch.Tensor, scale: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    """The fp32 values of a quantised weight."""
    scales = scale_values(scale)
    if fmt.quant == FP8:
        values = weight.to(torch.float32)
    elif fmt.quant == FP4:
        values = FP4_VALUES[fp4_unpack(weight).long()]
    else:
        raise QuantisationError(f"unknown quantisation {fmt.quant!r}")
    return values * _expand(scales, fmt.block, tuple(values.shape))


# --- quantise ---------------------------------------------------------------------------------------
def _encode(scaled: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    if fmt.quant == FP8:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return fp4_encode(scaled)


def _decode(codes: torch.Tensor, fmt: SourceFormat) -> torch.Tensor:
    if fmt.quant == FP8:
        return codes.to(torch.float32)
    return FP4_VALUES[codes.long()]


def requantise(
    weight: torch.Tensor, fmt: SourceFormat, original_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Quantise `weight` to `fmt`; returns (stored weight, scale, number of blocks that needed a fresh scale).

    A block keeps its `original_scale` when quantising under it gives back exactly
    `weight`'s values (in `weight`'s dtype): then the stored bytes are the original
    ones. Otherwise the block gets the smallest scale that holds its amax.
    """
    values = weight.to(torch.float32)
    scale_dtype = getattr(torch, fmt.scale_dtype)
    fmt_max = FP8_MAX if fmt.quant == FP8 else FP4_MAX
    fresh = _fresh_scale(_amax(values, fmt.block), fmt_max, scale_dtype)
    if original_scale is None:
        scale = fresh
        keep = torch.zeros(fresh.shape, dtype=torch.bool)
    else:
        if tuple(original_scale.shape) != tuple(fresh.shape):
            raise QuantisationError(f"original scale of shape {tuple(original_scale.shape)}; expected {tuple(fresh.shape)}")
        original = original_scale.to(scale_dtype)
        codes = _encode(values / _expand(scale_values(original), fmt.block, tuple(values.shape)), fmt)
        back = (_decode(codes, fmt) * _expand(scale_values(original), fmt.block, tuple(values.shape))).to(weight.dtype)
        exact = (back == weight) | (torch.isnan(back) & torch.isnan(weight))
        keep = _block_reduce(exact.to(torch.float32), fmt.block, lambda b: b.amin(dim=(1, 3)), pad=1.0) > 0
        scale = torch.where(keep, original.view(torch.uint8) if scale_dtype == E8M0 else original,
                            fresh.view(torch.uint8) if scale_dtype == E8M0 else fresh)
        if scale_dtype == E8M0:
            scale = scale.view(E8M0)
    return quantise_with_scale(values, fmt, scale), scale, int((~keep).sum())


def quantise_with_scale(weight: torch.Tensor, fmt: SourceFormat, scale: torch.Tensor) -> torch.Tensor:
    """The stored weight (float8 codes, or packed FP4) of `weight` under the given per-block scales."""
    values = weight.to(torch.float32)
    codes = _encode(values / _expand(scale_values(scale), fmt.block, tuple(values.shape)), fmt)
    return codes if fmt.quant == FP8 else fp4_pack(codes)
