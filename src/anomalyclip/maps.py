"""From patch-text similarities to pixel maps: upsampling and Gaussian smoothing in torch.

The smoothing equals ``scipy.ndimage.gaussian_filter(map, sigma)`` with its defaults
(mode "reflect", truncate 4.0), run as two 1-D convolutions on the whole batch.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float, truncate: float) -> tuple[float, ...]:
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


def _reflect_indices(length: int, radius: int, device: torch.device) -> Tensor:
    """scipy's "reflect" extension (d c b a | a b c d | d c b a), any radius."""
    positions = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


def gaussian_smooth(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Smooth (B, H, W) maps; sigma 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    kernel_values = _gaussian_kernel(float(sigma), float(truncate))
    radius = len(kernel_values) // 2
    kernel = torch.tensor(kernel_values, dtype=torch.float64, device=maps.device)
    work = maps.to(torch.float64).unsqueeze(1)
    height, width = maps.shape[-2:]
    work = work.index_select(3, _reflect_indices(width, radius, maps.device))
    work = F.conv2d(work, kernel.view(1, 1, 1, -1))
    work = work.index_select(2, _reflect_indices(height, radius, maps.device))
    work = F.conv2d(work, kernel.view(1, 1, -1, 1))
    return work.squeeze(1).to(maps.dtype)


def patch_probabilities(
    patch_tokens: Tensor, text_features: Tensor, grid: tuple[int, int], temperature: float
) -> Tensor:
    """(B, 2, grid_h, grid_w) softmax over [normal, abnormal] for every patch token.

    patch_tokens: (B, 1 + gh * gw, E) L2-normalised, class token first; text_features:
    (2, E) L2-normalised.
    """
    logits = patch_tokens[:, 1:] @ text_features.T / temperature
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
