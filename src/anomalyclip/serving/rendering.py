"""From a prediction to what a client shows: overlay and mask PNGs, and the encoded map.

Everything is drawn at reduced sizes (``overlay_max_side``, ``map_max_side``) straight
from the model-resolution map, placed on the image by the method's own
:class:`~anomalyclip.preprocess.PreProcessor` (so a centre-cropped method's map lands on
the crop): a 40-megapixel upload never gets a full-resolution float map. Thresholds come
from the prediction's :class:`~anomalyclip.postprocess.PostProcessor`; without a pixel
threshold there is no mask, without an image threshold no verdict.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
from PIL import Image

from anomalyclip.predictor import AnomalyPrediction
from anomalyclip.serving.schemas import AnomalyMap, Prediction, Size
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.visualize import (
    colour_scale,
    defect_mask,
    encode_png,
    fit_within,
    placed_map,
    render_overlay,
)


@dataclass
class Rendered:
    """The JSON answer for one image, and the PNGs it embeds (for ``format=png``)."""

    prediction: Prediction
    overlay_png: bytes
    mask_png: bytes | None


def encode_map(anomaly_map: np.ndarray) -> AnomalyMap:
    """The map quantised to 16 bits over its own range: compact, and exact to 1/65535."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    span = high - low
    scaled = (anomaly_map - low) / span if span > 0 else np.zeros_like(anomaly_map)
    quantised = np.round(scaled * 65535.0).astype("<u2")
    height, width = anomaly_map.shape
    return AnomalyMap(
        width=width,
        height=height,
        min=low,
        max=high,
        data=base64.b64encode(quantised.tobytes()).decode("ascii"),
    )


def render(
    name: str, image: Image.Image, prediction: AnomalyPrediction, settings: ServiceSettings
) -> Rendered:
    """The overlay, mask, reduced map and decisions for one scored image."""
    post = prediction.postprocessor
    low = prediction.map_range[0]
    small_map = placed_map(prediction, fit_within(image.size, settings.map_max_side), fill=low)
    # one answer has no run to take a range from: the threshold mid-scale, else the
    # method's map range (colour_scale without maps), the same for every request
    scale = colour_scale(post.map_range, post.pixel_threshold)
    drawn = render_overlay(
        image, prediction, max_side=settings.overlay_max_side, scale=(scale.low, scale.high)
    )
    overlay_size = drawn.image.size
    overlay_map = drawn.placed_map
    overlay_png = encode_png(drawn.image)
    pixel_threshold = post.pixel_threshold
    mask_png = None
    if pixel_threshold is not None:
        mask_png = encode_png(defect_mask(overlay_map, pixel_threshold))
    anomalous = post.verdict(prediction.score)
    result = Prediction(
        filename=name,
        score=prediction.score,
        threshold=post.image_threshold,
        anomalous=anomalous,
        verdict=None if anomalous is None else ("anomalous" if anomalous else "normal"),
        image_size=Size(width=image.width, height=image.height),
        pixel_threshold=pixel_threshold,
        anomalous_fraction=post.defect_fraction(small_map),
        map=encode_map(small_map),
        overlay_size=Size(width=overlay_size[0], height=overlay_size[1]),
        overlay_png=base64.b64encode(overlay_png).decode("ascii"),
        mask_png=None if mask_png is None else base64.b64encode(mask_png).decode("ascii"),
    )
    return Rendered(result, overlay_png, mask_png)
