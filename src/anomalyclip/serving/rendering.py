"""From a prediction to what a client shows: overlay and mask PNGs, and the encoded map.

Everything is drawn at reduced sizes (``overlay_max_side``, ``map_max_side``) straight
from the model-resolution map, placed on the image by the method's own
:class:`~anomalyclip.preprocess.PreProcessor` (so a centre-cropped method's map lands on
the crop): a 40-megapixel upload never gets a full-resolution float map. Thresholds come
from the prediction's :class:`~anomalyclip.postprocess.PostProcessor`; without a pixel
threshold there is no mask, without an image threshold no verdict.

A :class:`Rendered` image keeps only compact bytes (the PNGs, the 16-bit map); its JSON,
three quarters larger in base64, is made when it is sent (:meth:`Rendered.prediction`).
A batch's images are not even rendered until their turn to be sent comes
(:class:`Scored`, :func:`render_scored`): until then each holds its upload's bytes,
which the request holds anyway, and its model-resolution map, so a client that does not
read its answer costs the service about what it uploaded, not its overlays.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip.predictor import AnomalyPrediction
from anomalyclip.preprocess import load_image
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
    """One scored image: its answer's fields, the PNGs and the encoded map as bytes.

    ``summary`` holds the :class:`Prediction` fields other than the map and the PNGs;
    ``map_header`` the map's width, height and range, ``map_values`` its uint16 values.
    """

    summary: dict[str, Any]
    map_header: dict[str, Any]
    map_values: bytes
    overlay_png: bytes
    mask_png: bytes | None

    @property
    def prediction(self) -> Prediction:
        """The JSON answer, its base64 text made now (not held between calls)."""
        return Prediction(
            **self.summary,
            map=AnomalyMap(**self.map_header, data=base64_text(self.map_values)),
            overlay_png=base64_text(self.overlay_png),
            mask_png=None if self.mask_png is None else base64_text(self.mask_png),
        )


@dataclass
class Scored:
    """One scored image not yet rendered: its file name, upload bytes and decided prediction."""

    filename: str
    data: bytes
    prediction: AnomalyPrediction


def render_scored(scored: Scored, settings: ServiceSettings) -> Rendered:
    """Decode the upload again (it decoded when it was scored) and render it."""
    image = load_image(scored.data, settings.max_pixels)
    return render(scored.filename, image, scored.prediction, settings)


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def quantised_map(anomaly_map: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """The map quantised to 16 bits over its own range: compact, and exact to 1/65535.

    Returns the :class:`AnomalyMap` fields but ``data``, and the little-endian values.
    """
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    span = high - low
    scaled = (anomaly_map - low) / span if span > 0 else np.zeros_like(anomaly_map)
    quantised = np.round(scaled * 65535.0).astype("<u2")
    height, width = anomaly_map.shape
    return {"width": width, "height": height, "min": low, "max": high}, quantised.tobytes()


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
    summary = {
        "filename": name,
        "score": prediction.score,
        "threshold": post.image_threshold,
        "anomalous": anomalous,
        "verdict": None if anomalous is None else ("anomalous" if anomalous else "normal"),
        "image_size": Size(width=image.width, height=image.height),
        "pixel_threshold": pixel_threshold,
        "anomalous_fraction": post.defect_fraction(small_map),
        "overlay_size": Size(width=overlay_size[0], height=overlay_size[1]),
    }
    map_header, map_values = quantised_map(small_map)
    return Rendered(summary, map_header, map_values, overlay_png, mask_png)
