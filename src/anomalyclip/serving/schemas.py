"""The service's response shapes: they validate what is sent and make the OpenAPI page.

Thresholds may be absent (none given, none calibrated); every field that depends on one
is then null rather than invented, so a client can tell "normal" from "not decided".
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, Field

ThresholdSource = Literal["given", "calibrated"]


class Size(BaseModel):
    width: int
    height: int


class AnomalyMap(BaseModel):
    """The anomaly map at reduced resolution, for thresholding in the browser.

    ``data`` is base64 of little-endian uint16 values, row-major, ``width * height`` of
    them; a value q stands for ``min + q / 65535 * (max - min)``.
    """

    width: int
    height: int
    min: float
    max: float
    encoding: Literal["uint16le"] = "uint16le"
    data: str


class Prediction(BaseModel):
    filename: str
    score: float = Field(description="the image's anomaly score (AnomalyCLIP: a probability)")
    threshold: float | None = Field(description="image threshold; null: none given or calibrated")
    anomalous: bool | None = Field(description="score >= threshold; null without a threshold")
    verdict: Literal["anomalous", "normal"] | None
    image_size: Size
    pixel_threshold: float | None = Field(description="mask threshold; null: no mask")
    anomalous_fraction: float | None = Field(
        description="share of the map at or over pixel_threshold; null without one"
    )
    map: AnomalyMap
    overlay_size: Size
    overlay_png: str = Field(description="base64 PNG: the heatmap blended on the image")
    mask_png: str | None = Field(
        description="base64 PNG: white where the map >= pixel_threshold; null without one"
    )


class FailedImage(BaseModel):
    filename: str
    status: int
    detail: str


class BatchResult(BaseModel):
    results: list[Prediction | FailedImage]
    succeeded: int
    failed: int


class Health(BaseModel):
    status: Literal["ok"]
    pending: int
    version: str


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_batch_size: int
    max_set_size: int
    max_set_pixels: int
    request_timeout_s: float
    header_timeout_s: float = Field(description="to send the request line and headers (408)")
    body_timeout_s: float = Field(description="most the body may stall between pieces (408)")
    body_deadline_s: float = Field(description="most the whole body may take (408)")
    min_body_rate: float = Field(
        description="bytes/s a body must average after body_rate_grace_s (else 408)"
    )
    body_rate_grace_s: float = Field(description="time before the body rate is enforced")


class ModelInfo(BaseModel):
    """What :meth:`Predictor.describe <anomalyclip.predictor.Predictor.describe>` says,
    with the thresholds in force and the service's limits.

    ``backbone``, ``features`` and ``architecture`` are read from the method's settings
    where it records them (AnomalyCLIP, in torch or ONNX, does), else null. No field holds
    a path on the server: files are named by base name, and the backbone by its checksum.
    """

    method: str
    methods: list[str] = Field(
        description="every method this service offers; the first is the default"
    )
    scores_sets: bool = Field(
        description="the method's images score each other: send them together to /v1/predict/set"
    )
    backbone: str | None = Field(description="the backbone's name (a file's base name, no path)")
    backbone_sha256: str | None = Field(description="checksum of the backbone's weights")
    image_size: int
    features: list[int] | None
    image_threshold: float | None
    image_threshold_source: ThresholdSource | None
    pixel_threshold: float | None
    pixel_threshold_source: ThresholdSource | None
    false_alarm: dict[str, Any] | None = Field(
        default=None,
        description="what thresholds set for a false-alarm rate promise: target, n_good, "
        "expected, upper_bound (at confidence) and the thresholds it applies_to",
    )
    map_range: tuple[float, float]
    architecture: dict[str, Any] | None
    settings: dict[str, Any]
    limits: Limits
    version: str


class ReferenceSet(BaseModel):
    """Known-good images the service keeps for later requests (``?references=ID``)."""

    id: str = Field(description="pass as ?references=ID to score against these images")
    method: str
    count: int
    failed: list[FailedImage]
    bytes: int = Field(description="memory the references' bank takes in the service")


class ErrorBody(BaseModel):
    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (413, "upload, pixel count or batch over the limits"),
        (415, "not multipart, or a file that is not an image"),
        (422, "corrupt or empty image, or invalid parameters"),
        (503, "too many requests waiting"),
        (504, "inference did not finish in time"),
    )
}


FILE_SUFFIXES = {
    ".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".onnx", ".json", ".yaml", ".csv",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
}  # fmt: skip


def without_path(text: str) -> str:
    """A file's base name in place of its path on the server; other text unchanged.

    Absolute and home paths always count as paths; relative ones when they name a file
    of a kind the project reads ("refs/good.png"), so that names with a slash, such as
    "ViT-L/14@336px", are left alone.
    """
    unified = text.strip().replace("\\", "/")
    absolute = unified.startswith(("/", "~")) or (len(unified) > 2 and unified[1:3] == ":/")
    relative_file = "/" in unified and PurePath(unified).suffix.lower() in FILE_SUFFIXES
    if not (absolute or relative_file):
        return text
    return unified.rstrip("/").rsplit("/", 1)[-1] or "(a folder)"


def sanitised(data: Any) -> Any:
    """JSON-safe settings for any client: non-finite floats become None, keys strings,
    tuples lists, and paths on the server their base names.

    Settings come from checkpoints (calibration records and the like) and may hold NaN,
    which strict JSON cannot carry, and file paths (weights, reference images), which
    tell a client where the server keeps its files.
    """
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, str):
        return without_path(data)
    if isinstance(data, dict):
        return {str(key): sanitised(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [sanitised(value) for value in data]
    return data
