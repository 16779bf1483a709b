"""Heatmap overlays and defect masks as images people can look at.

Normalisation: every model knows the range its maps lie in (an AnomalyCLIP map is a sum
of per-layer values in [0, 1], so [0, number of layers]; see
:class:`~anomalyclip.postprocess.PostProcessor`). Given a prediction, overlays use that
fixed range, so the same colour means the same value on every image and a clean image
stays blue instead of having its noise stretched to red. A bare array without ``vmax`` is
stretched to its own maximum (what the authors' visualisation does), which shows where a
map peaks but makes colours incomparable between images.

Colour maps are small piecewise-linear tables in numpy: no matplotlib needed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from anomalyclip.colormaps import colormap_table
from anomalyclip.predictor import AnomalyPrediction


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) float32 from a 2-D map, bilinear as ``map_at_original_size``.

    ``size`` is (width, height) as PIL gives it.
    """
    array = _as_map(anomaly_map)
    width, height = size
    if array.shape == (height, width):
        return array
    import torch

    from anomalyclip.maps import upsample

    return upsample(torch.from_numpy(array)[None], (height, width))[0].numpy()


def normalise(
    anomaly_map: np.ndarray, vmin: float | None = 0.0, vmax: float | None = None
) -> np.ndarray:
    """Map values to [0, 1] over [vmin, vmax]; None takes that end from the map itself."""
    array = _as_map(anomaly_map)
    low = float(array.min()) if vmin is None else float(vmin)
    high = float(array.max()) if vmax is None else float(vmax)
    if high < low:
        raise ValueError(f"vmax {high} is below vmin {low}")
    span = high - low
    if span <= 0.0:
        return np.zeros_like(array)
    return np.clip((array - low) / span, 0.0, 1.0)


def colorize(
    anomaly_map: np.ndarray,
    vmin: float | None = 0.0,
    vmax: float | None = None,
    colormap: str = "jet",
) -> Image.Image:
    """The map alone as an RGB image at the map's own resolution."""
    indices = np.round(normalise(anomaly_map, vmin, vmax) * 255.0).astype(np.uint8)
    return Image.fromarray(colormap_table(colormap)[indices], "RGB")


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray | AnomalyPrediction,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = "jet",
) -> Image.Image:
    """The colour-mapped anomaly map blended on the image, at the image's own resolution.

    ``alpha`` is the heatmap's weight (0: the image only, 1: the heatmap only). Given a
    prediction, its map is placed on the image as the model's preprocessing saw it and
    coloured over the model's map range. A bare map may be at model resolution (it is
    resized bilinearly to the image); without ``vmin``/``vmax`` it spans 0 to its own
    maximum.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    if isinstance(anomaly_map, AnomalyPrediction):
        low, high = anomaly_map.map_range
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
        array = anomaly_map.map_at_original_size()
    else:
        array = anomaly_map
    heat = colorize(resize_map(array, base.size), 0.0 if vmin is None else vmin, vmax, colormap)
    return Image.blend(base, heat, alpha)


def defect_mask(
    anomaly_map: np.ndarray, threshold: float, size: tuple[int, int] | None = None
) -> Image.Image:
    """Binary "L" image: 255 where the map is at or above ``threshold``, else 0.

    ``size`` (width, height) resizes the map before thresholding, so mask edges follow the
    smooth map rather than blocky upscaled pixels.
    """
    array = _as_map(anomaly_map)
    if size is not None:
        array = resize_map(array, size)
    # uint8 from the start: np.where(..., 255, 0) built an int64 array 8x the mask's size
    return Image.fromarray(np.multiply(array >= threshold, 255, dtype=np.uint8), "L")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image, for HTTP responses and data URIs."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colorbar(width: int = 256, height: int = 12, colormap: str = "jet") -> Image.Image:
    """A horizontal legend strip, low values on the left."""
    if width < 1 or height < 1:
        raise ValueError(f"colorbar size must be positive, got {width}x{height}")
    row = colormap_table(colormap)[np.round(np.linspace(0, 255, width)).astype(int)]
    return Image.fromarray(np.repeat(row[None], height, axis=0), "RGB")


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    array = np.asarray(anomaly_map, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"an anomaly map must be 2-D (H, W), got shape {array.shape}")
    if np.isfinite(array.sum(dtype=np.float64)):
        return array  # the usual case: no copy (a full-size map can be hundreds of MB)
    return np.nan_to_num(array, nan=0.0)
