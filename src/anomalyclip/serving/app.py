"""The HTTP service: one model loaded once, inference in a single worker, a browser page.

Nothing in a request ever names a file on the server: uploads are decoded from memory,
and the page and its scripts are read from package data at start-up and served from a
fixed table. Requests wait in a bounded queue for the one inference worker, so memory
stays bounded however many clients connect: past the queue's length they get 503, past
the request timeout 504.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import anomalyclip
from anomalyclip.inference import default_pixel_threshold
from anomalyclip.model import AnomalyCLIP, AnomalyPrediction
from anomalyclip.preprocess import ImageLoadError, load_image
from anomalyclip.visualize import defect_mask, encode_png, map_range, overlay, resize_map

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_THRESHOLD = 0.5
MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries and part headers around the file bytes
ACCEPTED_OCTET_TYPES = ("application/octet-stream", "")
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and defaults of one service instance.

    Thresholds left as None fall back to the model's calibrated ones, then to 0.5 for the
    image score and to half the map's range for the pixel map
    (:func:`~anomalyclip.inference.default_pixel_threshold`).
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_size: int = 16
    request_timeout_s: float = 60.0
    max_pending: int = 32
    max_pending_bytes: int = 256 * 1024 * 1024
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    map_max_side: int = 256
    overlay_max_side: int = 1024

    def __post_init__(self) -> None:
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "max_batch_size",
            "max_pending",
            "max_pending_bytes",
            "map_max_side",
            "overlay_max_side",
        )
        problems = [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        if not self.request_timeout_s > 0:
            problems.append("request_timeout_s must be positive")
        if problems:
            raise ValueError("invalid service settings: " + "; ".join(problems))


# response shapes (they make the OpenAPI description) ----------------------------------


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
    score: float = Field(description="probability that the image is anomalous")
    threshold: float
    anomalous: bool
    verdict: Literal["anomalous", "normal"]
    image_size: Size
    pixel_threshold: float
    anomalous_fraction: float = Field(description="share of the map at or over pixel_threshold")
    map: AnomalyMap
    overlay_size: Size
    overlay_png: str = Field(description="base64 PNG: the heatmap blended on the image")
    mask_png: str = Field(description="base64 PNG: white where the map >= pixel_threshold")


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
    request_timeout_s: float


class ModelInfo(BaseModel):
    backbone: str
    device: str
    dtype: str
    image_size: int
    features: list[int]
    image_threshold: float
    image_threshold_source: Literal["service", "calibrated", "default"]
    pixel_threshold: float
    pixel_threshold_source: Literal["service", "calibrated", "default"]
    map_range: tuple[float, float]
    architecture: dict[str, Any]
    config: dict[str, Any]
    limits: Limits
    version: str


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


# uploads -------------------------------------------------------------------------------


@dataclass
class Upload:
    """A file as the client sent it; its name is only echoed back, never opened."""

    filename: str
    content_type: str
    data: bytes


def display_name(name: str | None) -> str:
    """The client's file name reduced to a printable base name, for messages only."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(ch for ch in base if ch.isprintable())
    return printable[:200] or "upload"


def check_upload(upload: Upload, settings: ServiceSettings) -> None:
    """Cheap checks before queueing: content type, emptiness, format and pixel count.

    Reads only the image header, so a decompression bomb is refused before it is decoded.
    """
    name = upload.filename
    content_type = upload.content_type.split(";")[0].strip().lower()
    if not (content_type.startswith("image/") or content_type in ACCEPTED_OCTET_TYPES):
        raise HTTPException(
            415, f"{name} was sent as {content_type}; upload an image (PNG, JPEG, BMP, TIFF, WebP)"
        )
    if not upload.data:
        raise HTTPException(422, f"{name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(upload.data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise HTTPException(
            415,
            f"{name} is not an image in a format the service reads (PNG, JPEG, BMP, TIFF, WebP)",
        ) from None
    except Image.DecompressionBombError as error:
        raise HTTPException(413, f"{name} refused as a decompression bomb: {error}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise HTTPException(422, f"{name}: corrupt or truncated image ({error})") from None
    if width * height > settings.max_pixels:
        raise HTTPException(
            413,
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{settings.max_pixels:,}",
        )


async def read_upload(file: UploadFile, settings: ServiceSettings) -> Upload:
    """The upload's bytes, refusing more than the per-file limit without reading it all."""
    name = display_name(file.filename)
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(
            413, f"{name} is larger than the upload limit of {settings.max_upload_bytes:,} bytes"
        )
    return Upload(name, file.content_type or "", data)


# rendering -----------------------------------------------------------------------------


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so the longer side is at most max_side."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_map(anomaly_map: np.ndarray) -> AnomalyMap:
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


@dataclass
class Rendered:
    prediction: Prediction
    overlay_png: bytes
    mask_png: bytes


def render(
    name: str,
    image: Image.Image,
    prediction: AnomalyPrediction,
    image_threshold: float,
    pixel_threshold: float,
    value_range: tuple[float, float],
    settings: ServiceSettings,
) -> Rendered:
    small_map = resize_map(prediction.anomaly_map, fit_within(image.size, settings.map_max_side))
    overlay_size = fit_within(image.size, settings.overlay_max_side)
    shown = image if overlay_size == image.size else image.resize(overlay_size, Image.BILINEAR)
    overlay_map = resize_map(prediction.anomaly_map, overlay_size)
    overlay_png = encode_png(overlay(shown, overlay_map, vmin=value_range[0], vmax=value_range[1]))
    mask_png = encode_png(defect_mask(overlay_map, pixel_threshold))
    anomalous = prediction.score >= image_threshold
    result = Prediction(
        filename=name,
        score=prediction.score,
        threshold=image_threshold,
        anomalous=anomalous,
        verdict="anomalous" if anomalous else "normal",
        image_size=Size(width=image.width, height=image.height),
        pixel_threshold=pixel_threshold,
        anomalous_fraction=float((small_map >= pixel_threshold).mean()),
        map=encode_map(small_map),
        overlay_size=Size(width=overlay_size[0], height=overlay_size[1]),
        overlay_png=base64.b64encode(overlay_png).decode("ascii"),
        mask_png=base64.b64encode(mask_png).decode("ascii"),
    )
    return Rendered(result, overlay_png, mask_png)


# inference -----------------------------------------------------------------------------


class InferenceWorker:
    """One thread runs the model; requests queue for it.

    At most ``max_pending`` requests and ``max_pending_bytes`` of uploads wait at once (a
    single request is always let in), so memory stays bounded under any load. The lock
    also guards the model against anyone else sharing the same instance.
    """

    def __init__(self, model: AnomalyCLIP, settings: ServiceSettings) -> None:
        self.model = model
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalyclip")
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0

    @property
    def pending(self) -> int:
        return self._pending

    def _admit(self, size: int) -> None:
        with self._count_lock:
            full = self._pending >= self.settings.max_pending or (
                self._pending > 0 and self._pending_bytes + size > self.settings.max_pending_bytes
            )
            if full:
                raise HTTPException(
                    503,
                    f"the service is busy ({self._pending} requests waiting); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._pending += 1
            self._pending_bytes += size

    def _release(self, size: int) -> None:
        with self._count_lock:
            self._pending -= 1
            self._pending_bytes -= size

    async def run(self, job: Callable[..., Any], *args: Any, size: int = 0) -> Any:
        """``job(*args)`` on the worker thread; ``size`` is the bytes it holds while waiting."""
        self._admit(size)
        future = self._executor.submit(job, *args)
        future.add_done_callback(lambda _: self._release(size))
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), self.settings.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise HTTPException(
                504, f"inference did not finish within {self.settings.request_timeout_s:g} s"
            ) from None

    def analyse(
        self, uploads: list[Upload], image_threshold: float, pixel_threshold: float
    ) -> list[Rendered | HTTPException]:
        """Decode, score and render; a file that fails to decode fails alone.

        Images are scored in groups of at most ``max_pixels`` decoded pixels, so a batch of
        large images holds about one of them in memory at a time, not all.
        """
        outcomes: list[Rendered | HTTPException | None] = [None] * len(uploads)
        group: list[tuple[int, Image.Image]] = []

        def score_group() -> None:
            with self._model_lock:
                predictions = self.model.predict([image for _, image in group], len(group))
            for (index, image), prediction in zip(group, predictions, strict=True):
                outcomes[index] = render(
                    uploads[index].filename,
                    image,
                    prediction,
                    image_threshold,
                    pixel_threshold,
                    map_range(self.model.config),
                    self.settings,
                )
            group.clear()

        for index, upload in enumerate(uploads):
            try:
                image = load_image(upload.data, self.settings.max_pixels)
            except ImageLoadError as error:
                outcomes[index] = HTTPException(422, f"{upload.filename}: {error.reason}")
                continue
            pixels = sum(item.width * item.height for _, item in group)
            if group and pixels + image.width * image.height > self.settings.max_pixels:
                score_group()
            group.append((index, image))
        if group:
            score_group()
        return [outcome for outcome in outcomes if outcome is not None]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# thresholds ----------------------------------------------------------------------------

ThresholdSource = Literal["service", "calibrated", "default"]


def effective_thresholds(
    model: AnomalyCLIP, settings: ServiceSettings
) -> tuple[tuple[float, ThresholdSource], tuple[float, ThresholdSource]]:
    def pick(service: float | None, calibrated: float | None, default: float):
        if service is not None:
            return float(service), "service"
        if calibrated is not None:
            return float(calibrated), "calibrated"
        return float(default), "default"

    config = model.config
    return (
        pick(settings.image_threshold, config.image_threshold, DEFAULT_IMAGE_THRESHOLD),
        pick(settings.pixel_threshold, config.pixel_threshold, default_pixel_threshold(config)),
    )


# request guard -------------------------------------------------------------------------


class UploadGuard:
    """Refuses oversized bodies before they are read, and non-multipart uploads.

    A declared Content-Length over the limit is answered 413 at once; a chunked body is
    counted as it arrives and cut off when it passes the limit.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], default_limit: int) -> None:
        self.app = app
        self.limits = limits
        self.default_limit = default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limits.get(path, self.default_limit)
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > limit:
                message = f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}"
                await error_response(413, message)(scope, receive, send)
                return
        if path in self.limits:
            content_type = headers.get("content-type", "")
            if not content_type.lower().startswith("multipart/form-data"):
                message = (
                    f"send images as multipart/form-data (got {content_type or 'no content type'})"
                )
                await error_response(415, message)(scope, receive, send)
                return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit:,} bytes")
            return message

        await self.app(scope, counted_receive, send)


def error_response(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status)


# the application -----------------------------------------------------------------------


def load_static() -> dict[str, bytes]:
    folder = resources.files("anomalyclip.serving") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def create_app(model: AnomalyCLIP, settings: ServiceSettings | None = None) -> FastAPI:
    """The service around an already loaded model; run it with any ASGI server."""
    settings = settings or ServiceSettings()
    model.eval()
    worker = InferenceWorker(model, settings)
    (image_threshold, image_source), (pixel_threshold, pixel_source) = effective_thresholds(
        model, settings
    )
    static = load_static()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(
        title="AnomalyCLIP",
        version=anomalyclip.__version__,
        description="Zero-shot anomaly detection: upload images, get scores, verdicts, "
        "heatmap overlays and defect masks.",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.settings = settings
    per_file = settings.max_upload_bytes + MULTIPART_SLACK_BYTES
    app.add_middleware(
        UploadGuard,
        limits={
            "/v1/predict": per_file,
            "/v1/predict/batch": per_file * settings.max_batch_size,
        },
        default_limit=MULTIPART_SLACK_BYTES,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return error_response(422, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        logger.exception("request failed")
        return error_response(500, f"internal error ({type(error).__name__})")

    def resolve(threshold: float | None, pixel: float | None) -> tuple[float, float]:
        return (
            image_threshold if threshold is None else threshold,
            pixel_threshold if pixel is None else pixel,
        )

    async def analyse(uploads: list[Upload], thresholds: tuple[float, float]):
        started = time.perf_counter()
        size = sum(len(upload.data) for upload in uploads)
        outcomes = await worker.run(worker.analyse, uploads, *thresholds, size=size)
        logger.debug("%d image(s) in %.0f ms", len(uploads), 1e3 * (time.perf_counter() - started))
        return outcomes

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON, or the PNG asked for"},
            **ERROR_RESPONSES,
        },
        summary="Score one image",
    )
    async def predict(
        file: UploadFile = File(..., description="the image: PNG, JPEG, BMP, TIFF or WebP"),
        output_format: Literal["json", "png"] = Query(
            "json", alias="format", description="png returns the part asked for as the body"
        ),
        part: Literal["overlay", "mask"] = Query("overlay", description="with format=png"),
        threshold: float | None = Query(None, ge=0, le=1, description="image threshold"),
        pixel_threshold: float | None = Query(None, ge=0, description="mask threshold"),
    ) -> Any:
        upload = await read_upload(file, settings)
        check_upload(upload, settings)
        (outcome,) = await analyse([upload], resolve(threshold, pixel_threshold))
        if isinstance(outcome, HTTPException):
            raise outcome
        if output_format == "png":
            result = outcome.prediction
            return Response(
                outcome.overlay_png if part == "overlay" else outcome.mask_png,
                media_type="image/png",
                headers={
                    "X-Anomaly-Score": f"{result.score:.6f}",
                    "X-Anomaly-Verdict": result.verdict,
                    "Content-Disposition": f'inline; filename="{part}.png"',
                },
            )
        return outcome.prediction

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResult,
        responses=ERROR_RESPONSES,
        summary="Score several images; a bad file fails alone",
    )
    async def predict_batch(
        files: list[UploadFile] = File(..., description="the images"),
        threshold: float | None = Query(None, ge=0, le=1),
        pixel_threshold: float | None = Query(None, ge=0),
    ) -> BatchResult:
        if len(files) > settings.max_batch_size:
            raise HTTPException(
                413, f"{len(files)} files in one batch; the limit is {settings.max_batch_size}"
            )
        slots: list[FailedImage | Upload] = []
        for file in files:
            try:
                upload = await read_upload(file, settings)
                check_upload(upload, settings)
                slots.append(upload)
            except HTTPException as error:
                slots.append(
                    FailedImage(
                        filename=display_name(file.filename),
                        status=error.status_code,
                        detail=error.detail,
                    )
                )
        uploads = [slot for slot in slots if isinstance(slot, Upload)]
        outcomes = iter(await analyse(uploads, resolve(threshold, pixel_threshold)))
        results: list[Prediction | FailedImage] = []
        for slot in slots:
            if isinstance(slot, FailedImage):
                results.append(slot)
                continue
            outcome = next(outcomes)
            if isinstance(outcome, HTTPException):
                results.append(
                    FailedImage(
                        filename=slot.filename, status=outcome.status_code, detail=outcome.detail
                    )
                )
            else:
                results.append(outcome.prediction)
        failed = sum(isinstance(item, FailedImage) for item in results)
        return BatchResult(results=results, succeeded=len(results) - failed, failed=failed)

    @app.get("/healthz", response_model=Health, summary="Liveness and queue length")
    async def healthz() -> Health:
        return Health(status="ok", pending=worker.pending, version=anomalyclip.__version__)

    @app.get("/v1/model", response_model=ModelInfo, summary="Model configuration and limits")
    async def model_info() -> ModelInfo:
        config = model.config
        return ModelInfo(
            backbone=config.backbone,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            image_size=config.image_size,
            features=list(config.features),
            image_threshold=image_threshold,
            image_threshold_source=image_source,
            pixel_threshold=pixel_threshold,
            pixel_threshold_source=pixel_source,
            map_range=map_range(config),
            architecture=model.clip.arch.to_dict(),
            config=sanitised(config.to_dict()),
            limits=Limits(
                max_upload_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_pixels,
                max_batch_size=settings.max_batch_size,
                request_timeout_s=settings.request_timeout_s,
            ),
            version=anomalyclip.__version__,
        )

    def static_route(name: str) -> Callable[[], Awaitable[Response]]:
        async def serve_static() -> Response:
            return Response(static[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

        return serve_static

    app.get("/", include_in_schema=False)(static_route("index.html"))
    for name in ("app.js", "style.css"):
        app.get(f"/static/{name}", include_in_schema=False)(static_route(name))
    return app


def sanitised(data: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe configuration: non-finite floats become None."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(data)
