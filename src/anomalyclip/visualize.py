"""Heatmap overlays and defect masks as images people can look at.

Normalisation: every model knows the range its maps lie in (an AnomalyCLIP map is a sum
of per-layer values in [0, 1], so [0, number of layers]; see
:class:`~anomalyclip.postprocess.PostProcessor`). Given a prediction, overlays use that
fixed range, so the same colour means the same value on every image and a clean image
stays blue instead of having its noise stretched to red. A bare array without ``vmax`` is
stretched to its own maximum (what the authors' visualisation does), which shows where a
map peaks but makes colours incomparable between images.

Colour maps are small piecewise-linear tables in numpy: no matplotlib needed.

:func:`render_overlay` is the one overlay every output draws (predict's and watch's run
folders, the service's answers): the same reduction, map placement, colour scale
(:func:`colour_scale`) and grey for what a method did not score.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from anomalyclip.colormaps import colormap_table
from anomalyclip.predictor import AnomalyPrediction
from anomalyclip.preprocess import PreProcessor


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


@dataclass(frozen=True)
class ColourScale:
    """The map values an overlay's colours span, and how they were chosen (said in the
    log and the report). A run uses one for all its images, so a colour means one value
    across the run."""

    low: float
    high: float
    source: str


# the fixed range is kept while the run's maps fill at least this share of it
FILLED_SHARE = 0.5


def colour_scale(
    map_range: tuple[float, float],
    pixel_threshold: float | None,
    maps: Sequence[np.ndarray] = (),
) -> ColourScale:
    """What the scores mean, in colour: with a pixel threshold, the method's low end to
    twice the threshold's distance from it (the threshold mid-scale: above it is warm);
    else the method's fixed range where the maps fill it (probabilities) or where there
    are no ``maps`` to judge by (one answer of the service), and otherwise the robust
    range of ``maps`` (a run's first images: 1st to 99.9th percentile).

    Why: raw distances (MuSc near 0.3-0.5 on a 0-2 range) coloured over the fixed range
    are uniform blue even where the detection is perfect.
    """
    low, high = map_range
    if pixel_threshold is not None and pixel_threshold > low:
        return ColourScale(
            low,
            low + 2 * (pixel_threshold - low),
            f"pixel threshold {pixel_threshold:.4g} mid-scale",
        )
    if not maps:
        return ColourScale(low, high, "the method's map range")
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    bottom, top = (float(v) for v in np.percentile(values, [1.0, 99.9]))
    if top - bottom >= FILLED_SHARE * (high - low) or not top > bottom:
        return ColourScale(low, high, "the method's map range")
    return ColourScale(
        bottom,
        top,
        f"robust range of this run's first {len(maps)} images (1st-99.9th percentile of map "
        "values); the same for every image of the run",
    )


def fit_within(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so the longer side is at most
    ``max_side`` (None: as it is)."""
    width, height = size
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(width * scale)), max(1, round(height * scale))


def placed_map(prediction: AnomalyPrediction, size: tuple[int, int], fill: float) -> np.ndarray:
    """(height, width) map on the image shown at ``size``, as the method's input saw it
    (``fill`` outside a centre crop)."""
    preprocessor = prediction.preprocessor or PreProcessor(prediction.anomaly_map.shape[-1])
    return preprocessor.map_to_original(prediction.anomaly_map, size, fill=fill)


def scored_area(prediction: AnomalyPrediction, size: tuple[int, int]) -> Image.Image | None:
    """An "L" mask (255: scored) of an image shown at ``size`` whose map covers only part
    of it (a centre crop), or None where the map covers all of it."""
    preprocessor = prediction.preprocessor
    if preprocessor is None or preprocessor.resize != "center-crop":
        return None
    ones = np.ones_like(prediction.anomaly_map, dtype=np.float32)
    covered = preprocessor.map_to_original(ones, size, fill=0.0) >= 0.5
    if covered.all():
        return None
    return Image.fromarray(covered.astype(np.uint8) * 255, "L")


@dataclass(frozen=True)
class RenderedOverlay:
    """An overlay and the map placed on it (at its size: what a mask of it is cut from)."""

    image: Image.Image
    placed_map: np.ndarray


def render_overlay(
    image: Image.Image,
    prediction: AnomalyPrediction,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    max_side: int | None = None,
    scale: tuple[float, float] | None = None,
    full_map: np.ndarray | None = None,
) -> RenderedOverlay:
    """The overlay of one scored image, as every output draws it: the image reduced to at
    most ``max_side``, the map placed on it by the method's preprocessing, coloured over
    ``scale`` (default: the method's map range; see :func:`colour_scale`), and what the
    method did not score (outside a centre crop) in grey, never coloured as "low".
    The sizes are the file's (``prediction.original_size``): ``image`` may have been
    decoded at reduced scale. ``full_map``: the map at the original size when the caller
    made it already (716 MB at 13,376 x 13,376: made once)."""
    low, high = prediction.map_range if scale is None else scale
    original = prediction.original_size  # ``image`` may be decoded reduced (predict)
    size = fit_within(original, max_side)
    if size == original == image.size:
        shown = image
        shown_map = prediction.map_at_original_size() if full_map is None else full_map
    else:
        shown = image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)
        shown_map = placed_map(prediction, size, fill=low)
    blended = overlay(shown, shown_map, alpha, low, high, colormap=colormap)
    scored = scored_area(prediction, size)
    if scored is not None:
        grey = shown.convert("L").convert("RGB")
        blended = Image.composite(blended, grey, scored)
    return RenderedOverlay(blended, shown_map)


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
