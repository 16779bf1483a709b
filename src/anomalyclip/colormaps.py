"""Colour maps as small piecewise-linear tables in numpy: no matplotlib, and no torch, so
the command line can list them without loading the model's libraries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["COLORMAPS", "colormap_table"]

# (position in [0, 1], (r, g, b) in [0, 1]) anchors, interpolated linearly to 256 entries.
_ANCHORS: dict[str, Sequence[tuple[float, tuple[float, float, float]]]] = {
    # OpenCV's COLORMAP_JET, which the authors' visualisation uses.
    "jet": (
        (0.0, (0.0, 0.0, 0.5)),
        (0.125, (0.0, 0.0, 1.0)),
        (0.375, (0.0, 1.0, 1.0)),
        (0.625, (1.0, 1.0, 0.0)),
        (0.875, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ),
    "hot": (
        (0.0, (0.04, 0.0, 0.0)),
        (0.365, (1.0, 0.0, 0.0)),
        (0.746, (1.0, 1.0, 0.0)),
        (1.0, (1.0, 1.0, 1.0)),
    ),
    # matplotlib's viridis sampled at nine points: perceptually uniform, colour-blind safe.
    "viridis": (
        (0.0, (0.267, 0.005, 0.329)),
        (0.125, (0.283, 0.141, 0.458)),
        (0.25, (0.254, 0.265, 0.530)),
        (0.375, (0.207, 0.372, 0.553)),
        (0.5, (0.164, 0.471, 0.558)),
        (0.625, (0.128, 0.567, 0.551)),
        (0.75, (0.135, 0.659, 0.518)),
        (0.875, (0.478, 0.821, 0.318)),
        (1.0, (0.993, 0.906, 0.144)),
    ),
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}
COLORMAPS = tuple(_ANCHORS)


def colormap_table(name: str = "jet") -> np.ndarray:
    """(256, 3) uint8 lookup table for a colour map name in :data:`COLORMAPS`."""
    if name not in _ANCHORS:
        raise ValueError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    positions = np.array([p for p, _ in _ANCHORS[name]])
    colours = np.array([c for _, c in _ANCHORS[name]])
    samples = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(samples, positions, colours[:, i]) for i in range(3)], axis=1)
    return np.round(table * 255.0).astype(np.uint8)
