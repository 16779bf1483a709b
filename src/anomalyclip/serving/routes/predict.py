"""Scoring: one image (JSON or a PNG), a batch scored one by one, or a set scored together.

The routes are written against :class:`~anomalyclip.predictor.Predictor` only, so the
torch model, an ONNX export and MuSc are served the same way; inference runs in the
service's single worker.

Several images are answered as a stream (:func:`streamed_batch`): each image is rendered
and its JSON made only when the connection has taken the previous one, so a client that
does not read holds its uploads' bytes and the maps at model resolution, not the whole
answer (before, about five times the answer's size); the connection's write timeout then
closes it. At most ``RENDERING_AT_ONCE`` images are rendered at a time, beside the worker.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic_core import to_json

from anomalyclip.serving.dependencies import (
    Service,
    ServiceDep,
    merged,
    method_query,
    pixel_query,
    references_query,
    threshold_query,
)
from anomalyclip.serving.rendering import Rendered, Scored, render_scored
from anomalyclip.serving.schemas import ERROR_RESPONSES, BatchResult, FailedImage, Prediction
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import (
    Upload,
    UploadError,
    accept_upload,
    check_batch_size,
    check_set,
)
from anomalyclip.utils.memory import release_free_memory

router = APIRouter()
RENDERING_AT_ONCE = 2
rendering_slots = threading.BoundedSemaphore(RENDERING_AT_ONCE)  # any event loop, any app


@router.post(
    "/v1/predict",
    response_model=Prediction,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG asked for"},
        **ERROR_RESPONSES,
    },
    summary="Score one image",
)
async def predict(
    request: Request,
    service: ServiceDep,
    file: UploadFile = File(..., description="the image: PNG, JPEG, BMP, TIFF or WebP"),
    output_format: Literal["json", "png"] = Query(
        "json", alias="format", description="png returns the part asked for as the body"
    ),
    part: Literal["overlay", "mask"] = Query("overlay", description="with format=png"),
    method: str | None = method_query,
    references: str | None = references_query,
    threshold: float | None = threshold_query,
    pixel_threshold: float | None = pixel_query,
) -> Any:
    name, predictor = service.chosen(method, references)
    if predictor.scores_sets:
        raise HTTPException(
            422,
            f"{name} scores the images of a set against each other; send at least two "
            "images to /v1/predict/set",
        )
    upload = await accept_upload(file, service.settings)
    (outcome,) = await service.analyse(
        request, name, predictor, [upload], threshold, pixel_threshold
    )
    if isinstance(outcome, UploadError):
        raise outcome
    assert isinstance(outcome, Rendered), "one image is rendered on the worker"
    if output_format == "png":
        return png_response(outcome, part)
    return outcome.prediction


def png_response(outcome: Rendered, part: str) -> Response:
    result = outcome.prediction
    body = outcome.overlay_png if part == "overlay" else outcome.mask_png
    if body is None:
        raise HTTPException(
            422,
            "no mask: the method has no calibrated pixel threshold and none was given "
            "(pass pixel_threshold)",
        )
    headers = {
        "X-Anomaly-Score": f"{result.score:.6f}",
        "Content-Disposition": f'inline; filename="{part}.png"',
    }
    if result.verdict is not None:
        headers["X-Anomaly-Verdict"] = result.verdict
    return Response(body, media_type="image/png", headers=headers)


@router.post(
    "/v1/predict/batch",
    response_model=BatchResult,
    responses=ERROR_RESPONSES,
    summary="Score several images, each on its own; a bad file fails alone",
)
async def predict_batch(
    request: Request,
    service: ServiceDep,
    files: list[UploadFile] = File(..., description="the images"),
    method: str | None = method_query,
    references: str | None = references_query,
    threshold: float | None = threshold_query,
    pixel_threshold: float | None = pixel_query,
) -> StreamingResponse:
    check_batch_size(len(files), service.settings)
    return await score_all(
        request, service, files, method, references, threshold, pixel_threshold, False
    )


@router.post(
    "/v1/predict/set",
    response_model=BatchResult,
    responses=ERROR_RESPONSES,
    summary="Score a set of images together (MuSc: they score each other)",
)
async def predict_set(
    request: Request,
    service: ServiceDep,
    files: list[UploadFile] = File(..., description="the images of one set"),
    method: str | None = method_query,
    references: str | None = references_query,
    threshold: float | None = threshold_query,
    pixel_threshold: float | None = pixel_query,
) -> StreamingResponse:
    return await score_all(
        request, service, files, method, references, threshold, pixel_threshold, True
    )


async def score_all(
    request: Request,
    service: Service,
    files: list[UploadFile],
    method: str | None,
    references: str | None,
    threshold: float | None,
    pixel_threshold: float | None,
    as_set: bool,
) -> StreamingResponse:
    """Several uploads, a bad file failing alone; scored together when ``as_set`` or
    when the method's images score each other (then within the set limits)."""
    name, predictor = service.chosen(method, references)
    slots = await service.accept_all(files)
    uploads = [slot for slot in slots if isinstance(slot, Upload)]
    together = as_set or predictor.scores_sets
    if together:
        check_set(uploads, service.settings)
    outcomes = await service.analyse(
        request, name, predictor, uploads, threshold, pixel_threshold, deferred=True
    )
    return streamed_batch(merged(slots, outcomes), service.settings)


def streamed_batch(
    items: list[Rendered | Scored | FailedImage], settings: ServiceSettings
) -> StreamingResponse:
    """:class:`BatchResult`'s JSON, sent image by image (see the module's docstring)."""
    failed = sum(isinstance(item, FailedImage) for item in items)
    tail = f'],"succeeded":{len(items) - failed},"failed":{failed}}}'.encode()
    parts = batch_parts(deque(items), tail, settings)
    return StreamingResponse(parts, media_type="application/json")


async def batch_parts(
    items: deque[Rendered | Scored | FailedImage], tail: bytes, settings: ServiceSettings
) -> AsyncIterator[bytes]:
    """The answer's pieces; each image is rendered, its JSON made and its bytes let go in
    its turn (the server asks for the next piece once the connection has taken the last)."""
    yield b'{"results":['
    first = True
    try:
        while items:
            item = items.popleft()
            if isinstance(item, Scored):  # rendered and encoded beside the event loop
                part = await to_thread.run_sync(render_in_turn, item, settings)
            else:
                part = as_json(item)
            del item  # while the part waits for the client, only its bytes are held
            if not first:
                yield b","
            yield part
            first = False
        yield tail
    finally:
        items.clear()
        release_free_memory()  # the overlays' memory, freed, back to the system


def as_json(item: Rendered | FailedImage) -> bytes:
    """One result's JSON; the base64 text it is made of is let go on return."""
    return to_json(item.prediction if isinstance(item, Rendered) else item)


def render_in_turn(scored: Scored, settings: ServiceSettings) -> bytes:
    """One image's JSON, rendered when it is its turn to be sent."""
    with rendering_slots:
        return as_json(render_scored(scored, settings))
