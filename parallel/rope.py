"""RoPE frequencies with ``model.rope_scaling``: Llama 3.1's frequency bands and YaRN, as their reference
implementations (and transformers) define them, computed in float64.

- ``llama3``: wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are slowed by
  ``factor``; shorter than ``... / high_freq_factor`` kept; in between a smooth blend.
- ``yarn``: frequencies blend from interpolated (``/ factor``) to original along a linear ramp between the
  correction dims of ``beta_fast`` and ``beta_slow`` rotations over ``original_max_position_embeddings``;
  cos and sin are multiplied by an attention factor (given, or from ``mscale`` / ``mscale_all_dim``, or
  ``0.1 ln(factor) + 1``); multi-head latent attention also multiplies its softmax scale by
  ``mscale(factor, mscale_all_dim) ** 2`` (DeepSeek-V3).
"""

from __future__ import annotations

import math

import torch

__all__ = ["scaled_inv_freq", "softmax_scale", "yarn_mscale"]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies ``[dim / 2]`` float64, the factor cos and sin are multiplied by)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if not scaling:
        return 1.0 / (theta ** exponents), 1.0
    kind, factor, old = scaling["type"], scaling["factor"], scaling["original_max_position_embeddings"]
    if kind == "llama3":
        inv = 1.0 / (theta ** exponents)
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind != "yarn":
        raise ValueError(f"unknown rope scaling {kind!r}")
    pos = theta ** exponents
    extrapolated, interpolated = 1.0 / pos, 1.0 / (factor * pos)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # as the reference: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp
    inv = interpolated * (1 - keep) + extrapolated * keep
    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv, float(attention)


def softmax_scale(qk_dim: int, scaling: dict | None) -> float:
    """Multi-head latent attention's score scale: ``qk_dim ** -0.5``, times ``mscale ** 2`` under YaRN with
    ``mscale_all_dim``."""
    scale = qk_dim ** -0.5
    if scaling and scaling["type"] == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale
