"""The released FP8/FP4 weight formats decoded from their bit layouts, for `verify`'s reference only.

Written apart from `bridge.quantisation` (which import uses) and sharing nothing with it,
so that a decoding mistake there makes `verify` fail instead of passing on both sides.
Every code is looked up in a table built from the format's definition:

- FP8 e4m3fn (OCP 8-bit floating point spec): sign, 4 exponent bits (bias 7), 3 mantissa
  bits; exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN (there is no infinity).
  One scale per block of the weight (128x128 in the releases, `weight_block_size` of
  `quantization_config`), partial blocks at the right and bottom edges.
- FP4 e2m1 (OCP MX spec): sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
  subnormal (m * 0.5). Two codes per byte, the lower nibble first (the DeepSeek-V4
  inference code's packing); one scale per 32 consecutive inputs of a row.
- Scales: E8M0 (OCP MX spec, `float8_e8m0fnu`) is 2^(e - 127), 0xFF is NaN; or fp32 as stored.
"""

from __future__ import annotations

import torch

FP4_SCALE_GROUP = 32


def _fp8_e4m3_table() -> torch.Tensor:
    values = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0x0F, code & 0x07
        if exponent == 0x0F and mantissa == 0x07:
            values.append(float("nan"))
        elif exponent == 0:
            values.append(sign * mantissa / 8 * 2.0**-6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float32)


def _fp4_e2m1_table() -> torch.Tensor:
    values = []
    for code in range(16):
        sign = -1.0 if code & 0x8 else 1.0
        exponent, mantissa = (code >> 1) & 0x3, code & 0x1
        values.append(
            sign
            * (
                mantissa * 0.5
                if exponent == 0
                else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
            )
        )
    return torch.tensor(values, dtype=torch.float32)


def _e8m0_table() -> torch.Tensor:
    return torch.tensor(
        [float("nan") if e == 0xFF else 2.0 ** (e - 127) for e in range(256)],
        dtype=torch.float64,
    ).float()


FP8_E4M3 = _fp8_e4m3_table()
FP4_E2M1 = _fp4_e2m1_table()
E8M0_SCALE = _e8m0_table()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8).long()


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.float32:
        return scale
    if scale.element_size() != 1:
        raise ValueError(f"a scale must be E8M0 (one byte) or fp32, not {scale.dtype}")
    return E8M0_SCALE[_bytes(scale)]


def decode_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """A float8_e4m3fn [rows, cols] weight with one scale per `block` -> fp32 values."""
    rows, cols = weight.shape
    values = FP8_E4M3[_bytes(weight)]
    per_element = (
        _scale_values(scale)
        .repeat_interleave(block[0], 0)
        .repeat_interleave(block[1], 1)
    )
    return values * per_element[:rows, :cols]


def decode_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An int8 [rows, cols / 2] weight of two e2m1 codes a byte with one scale per 32 inputs -> fp32 [rows, cols]."""
    codes = _bytes(packed)
    values = torch.stack(
        (FP4_E2M1[codes & 0x0F], FP4_E2M1[codes >> 4]), dim=-1
    ).flatten(-2)
    return values * _scale_values(scale).repeat_interleave(FP4_SCALE_GROUP, 1)


def decode(
    weight: torch.Tensor, scale: torch.Tensor, fp8_block: tuple[int, int]
) -> torch.Tensor:
    """A stored FP8 (float8_e4m3fn) or FP4 (int8, two codes a byte) weight and its scale -> fp32 values."""
    if weight.dtype == torch.float8_e4m3fn:
        return decode_fp8(weight, scale, fp8_block)
    if weight.dtype in (torch.int8, torch.uint8):
        return decode_fp4(weight, scale)
    raise ValueError(
        f"a weight with a scale must be float8_e4m3fn or int8 (FP4), not {weight.dtype}"
    )
