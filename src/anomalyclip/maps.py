"""From patch-text similarities to pixel maps: upsampling and Gaussian smoothing in torch.

The smoothing equals ``scipy.ndimage.gaussian_filter(map, sigma)`` with its defaults
(mode "reflect", truncate 4.0). It is separable and linear, reflection included, so it
is one matrix per axis: ``A_h @ map @ A_w.T`` on the whole batch. Two dense products
are several times faster than float64 convolutions on the CPU, match SciPy to 1e-15 in
float64, and export to ONNX as two MatMuls with constant matrices.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float, truncate: float) -> tuple[float, ...]:
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


def _reflect_indices(length: int, radius: int) -> np.ndarray:
    """scipy's "reflect" extension (d c b a | a b c d | d c b a), any radius."""
    positions = np.arange(-radius, length + radius) % (2 * length)
    return np.where(positions >= length, 2 * length - 1 - positions, positions)


@lru_cache(maxsize=8)
def _smoothing_matrix(length: int, sigma: float, truncate: float) -> np.ndarray:
    """Built in NumPy so that tracing (ONNX export) records it as a constant."""
    kernel = np.asarray(_gaussian_kernel(sigma, truncate))
    sources = np.lib.stride_tricks.sliding_window_view(
        _reflect_indices(length, len(kernel) // 2), len(kernel)
    )
    rows = np.broadcast_to(np.arange(length)[:, None], sources.shape)
    matrix = np.zeros((length, length))
    np.add.at(matrix, (rows, sources), np.broadcast_to(kernel, sources.shape))
    matrix.setflags(write=False)
    return matrix


def smoothing_matrix(
    length: int,
    sigma: float,
    truncate: float = 4.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(length, length) matrix applying the 1-D Gaussian with reflection along an axis.

    Row i holds the kernel weights of output i over the input positions, reflected
    samples folded onto the positions they mirror.
    """
    matrix = _smoothing_matrix(length, float(sigma), float(truncate))
    return torch.tensor(matrix, dtype=dtype, device=device)


def gaussian_smooth(
    maps: Tensor,
    sigma: float,
    truncate: float = 4.0,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Smooth (B, H, W) maps; sigma 0 returns them unchanged.

    ``compute_dtype`` float64 reproduces SciPy to rounding; float32 (what the ONNX export
    uses, as ONNX Runtime has no float64 MatMul on every provider) stays within 1e-6.
    """
    if sigma <= 0:
        return maps
    height, width = (int(side) for side in maps.shape[-2:])  # constants when traced
    rows = smoothing_matrix(height, sigma, truncate, compute_dtype, maps.device)
    columns = smoothing_matrix(width, sigma, truncate, compute_dtype, maps.device)
    with torch.autocast(maps.device.type, enabled=False):
        return (rows @ maps.to(compute_dtype) @ columns.T).to(maps.dtype)


def patch_probabilities(
    patch_tokens: Tensor, text_features: Tensor, grid: tuple[int, int], temperature: float
) -> Tensor:
    """(B, 2, grid_h, grid_w) softmax over [normal, abnormal] for every patch token.

    patch_tokens: (B, 1 + gh * gw, E) L2-normalised, class token first; text_features:
    (2, E) L2-normalised. Computed in float32, also under autocast: the softmax over
    cosines / 0.07 amplifies half-precision rounding.
    """
    with torch.autocast(patch_tokens.device.type, enabled=False):
        logits = patch_tokens[:, 1:].float() @ text_features.float().T / temperature
    probabilities = logits.softmax(dim=-1)
    batch = probabilities.shape[0]
    return probabilities.transpose(1, 2).reshape(batch, 2, *grid)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners False) resize of (B, C, h, w) or (B, h, w) maps."""
    squeeze = maps.dim() == 3
    if squeeze:
        maps = maps.unsqueeze(1)
    resized = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return resized.squeeze(1) if squeeze else resized


def layer_map(probabilities: Tensor) -> Tensor:
    """(p_abnormal + 1 - p_normal) / 2 from (B, 2, H, W) probabilities."""
    return (probabilities[:, 1] + 1 - probabilities[:, 0]) / 2
