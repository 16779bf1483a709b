"""Streams: images scored one at a time as a line produces them, and operators' marks.

``POST /v1/streams/{name}/images`` scores uploads in the stream ``name`` (made on first
use, with ``?method=`` and ``?window=``) with the rolling-bank logic ``watch`` uses
(:mod:`anomalyclip.inspection.streams`); a set method's first ``window`` images wait for
the cold start and come back together with the upload that completes it.
``POST /v1/streams/{name}/marks`` takes an operator's verdict (normal or defect) on a
scored image, by SHA-256; ``POST /v1/streams/{name}/undo`` goes back to a bank version;
``GET /v1/streams/{name}`` shows the bank and ``GET /v1/streams/{name}/audit`` the log.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field

from anomalyclip.inspection.streams import Stream, StreamUnknownImage
from anomalyclip.inspection.streams import Upload as StreamUpload
from anomalyclip.preprocess import ImageLoadError, load_image
from anomalyclip.serving.dependencies import ServiceDep, client_of, method_query, threshold_query
from anomalyclip.serving.rendering import render
from anomalyclip.serving.schemas import ERROR_RESPONSES
from anomalyclip.serving.uploads import Upload, accept_upload

router = APIRouter()

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class Mark(BaseModel):
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    verdict: Literal["normal", "defect"]


class Undo(BaseModel):
    bank_id: str = Field(min_length=1, max_length=64)


def _stream(request: Request, name: str) -> Stream:
    streams: dict[str, Stream] = request.app.state.streams
    if name not in streams:
        raise HTTPException(404, f"no stream {name!r}; post images to /v1/streams/{name}/images")
    return streams[name]


@router.post(
    "/v1/streams/{name}/images",
    responses=ERROR_RESPONSES,
    summary="Score images one at a time in a stream with a rolling bank of normal images",
)
async def stream_images(
    request: Request,
    service: ServiceDep,
    name: str,
    files: list[UploadFile] = File(..., description="the images, in the order they came"),
    method: str | None = method_query,
    window: int = Query(32, ge=2, le=256, description="images in the rolling bank"),
    threshold: float | None = threshold_query,
) -> dict[str, Any]:
    if not re.match(NAME_PATTERN, name):
        raise HTTPException(422, "a stream name is 1 to 64 letters, digits, '_', '.' or '-'")
    streams: dict[str, Stream] = request.app.state.streams
    if name not in streams:
        _, predictor = service.chosen(method)
        image_threshold = service.thresholds(predictor).with_given(threshold, None)
        streams[name] = Stream(
            name, predictor, window, image_threshold.image_threshold, request.app.state.audit
        )
    stream = streams[name]
    uploads: list[StreamUpload] = []
    for file in files:
        upload: Upload = await accept_upload(file, service.settings)
        try:
            image = load_image(upload.data, service.settings.max_pixels)
        except ImageLoadError as error:
            raise HTTPException(422, f"{upload.filename}: {error.reason}") from None
        uploads.append(StreamUpload(upload.filename, upload.data, image))
    worker = service.worker
    size = sum(len(u.data) for u in uploads)
    results = await worker.run(stream.score, uploads, size=size, client=client_of(request))
    post = service.thresholds(stream.scorer.method)
    scored = []
    for result in results:
        decided = dataclasses.replace(result.prediction, postprocessor=post)
        rendered = render(result.item.name, result.item.image, decided, service.settings)
        scored.append({**rendered.prediction.model_dump(), **result.extra_fields()})
    return {"stream": stream.describe(), "results": scored}


@router.post("/v1/streams/{name}/marks", responses=ERROR_RESPONSES, summary="Mark an image")
def mark_image(request: Request, name: str, mark: Mark) -> dict[str, Any]:
    # a plain function: FastAPI runs it in a thread, so waiting for the stream's lock
    # while an image is being scored never blocks the event loop
    stream = _stream(request, name)
    try:
        entry = stream.mark(mark.image_sha256, mark.verdict)
    except StreamUnknownImage as error:
        raise HTTPException(404, str(error.args[0])) from None
    return {"audit": entry, "stream": stream.describe()}


@router.post("/v1/streams/{name}/undo", responses=ERROR_RESPONSES, summary="Restore a bank")
def undo(request: Request, name: str, body: Undo) -> dict[str, Any]:
    stream = _stream(request, name)
    try:
        entry = stream.undo(body.bank_id)
    except KeyError as error:
        raise HTTPException(404, str(error.args[0])) from None
    return {"audit": entry, "stream": stream.describe()}


@router.get("/v1/streams/{name}", responses=ERROR_RESPONSES, summary="A stream's bank")
async def stream_info(request: Request, name: str) -> dict[str, Any]:
    return _stream(request, name).describe()


@router.get("/v1/streams/{name}/audit", responses=ERROR_RESPONSES, summary="The audit log")
async def stream_audit(request: Request, name: str) -> list[dict[str, Any]]:
    _stream(request, name)
    entries: list[dict[str, Any]] = request.app.state.audit.entries()
    return [entry for entry in entries if entry.get("stream") == name]
