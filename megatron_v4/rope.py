"""Rotary position embedding of DeepSeek-V4 attention.

As the official inference code (`precompute_freqs_cis`) and transformers
(`DeepseekV4RotaryEmbedding`, whose YaRN formula we follow) compute it.

V4 rotates only the LAST `qk_rope_head_dim` (r) channels of a head, and it
pairs them GPT-J style: channels (2i, 2i+1) form pair i, rotated by angle
`position * f_i`. Each layer uses one set of frequencies for everything it
rotates (queries, window keys, compressed entries, indexer, inverse rotation):

- sliding-window layers (ratio 0): f_i = rope_theta^(-2i/r);
- compressed layers (ratio 4 or 128): base compress_rope_theta, then the YaRN
  frequency rescale (no attention-magnitude scaling: cos/sin are not
  multiplied by YaRN's mscale).

The inverse rotation (the conjugate, angle -position * f_i) is applied to the
attention output: keys double as values, so values carry their absolute
rotation, and rotating the output back by the query position leaves only the
relative one.
"""

from __future__ import annotations

import math

import torch

from megatron_v4.config import DeepSeekV4TransformerConfig


def _yarn_ramp(config: DeepSeekV4TransformerConfig, base: float, rope_dim: int) -> torch.Tensor:
    """Per-pair weight in [0, 1] of the interpolated (divided by yarn_factor) frequency.

    Pairs below `low` rotate more than beta_fast times over the original context and keep
    their frequency; pairs above `high` rotate less than beta_slow times and are fully
    interpolated; the pairs in between blend linearly.
    """

    def pair_index_for_rotations(rotations: float) -> float:
        wavelength_ratio = config.yarn_original_max_position_embeddings / (rotations * 2 * math.pi)
        return rope_dim * math.log(wavelength_ratio) / (2 * math.log(base))

    low = max(math.floor(pair_index_for_rotations(config.yarn_beta_fast)), 0)
    high = min(math.ceil(pair_index_for_rotations(config.yarn_beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # a single-pair ramp would divide by zero
    pair = torch.arange(rope_dim // 2, dtype=torch.float32)
    return ((pair - low) / (high - low)).clamp(0, 1)


def rope_inverse_frequencies(config: DeepSeekV4TransformerConfig, compressed: bool) -> torch.Tensor:
    """The r/2 angular frequencies f_i (float32) of a sliding (`compressed=False`) or compressed layer."""
    rope_dim = config.qk_rope_head_dim
    base = config.compress_rope_theta if compressed else config.rope_theta
    wavelengths = base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    frequencies = 1.0 / wavelengths
    if not compressed or config.yarn_factor is None:
        return frequencies
    interpolated = 1.0 / (config.yarn_factor * wavelengths)
    ramp = _yarn_ramp(config, base, rope_dim)
    return interpolated * ramp + frequencies * (1 - ramp)


class DeepSeekV4RotaryEmbedding(torch.nn.Module):
    """cos/sin of the rotation angles of one layer type at given integer positions.

    `forward(positions)` takes positions of any shape (a tensor, so that decoding
    with an offset needs no special case) and returns (cos, sin) of shape
    [*positions.shape, r/2] in float32. The frequencies are a non-persistent
    buffer: they are derived from the config, never loaded from a checkpoint.
    """

    def __init__(self, config: DeepSeekV4TransformerConfig, compressed: bool):
        super().__init__()
        self.register_buffer(
            "inverse_frequencies", rope_inverse_frequencies(config, compressed), persistent=False
        )

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inverse_frequencies.to(positions.device)
        return angles.cos(), angles.sin()


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] channels of x in interleaved pairs (GPT-J style).

    cos/sin ([..., r/2]) must broadcast against x's leading dims. The rotation runs in
    float32 and the result has x's dtype; the leading (non-rope) channels pass through.
    `inverse=True` applies the conjugate rotation (angle negated).
    """
    rope_dim = 2 * cos.shape[-1]
    passthrough, rotated = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rotated.float().unflatten(-1, (rope_dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((passthrough, rotated.to(x.dtype)), dim=-1)
