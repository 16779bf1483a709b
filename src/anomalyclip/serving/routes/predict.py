"""Scoring: one image (JSON or a PNG), a batch scored one by one, or a set scored together.

The routes are written against :class:`~anomalyclip.predictor.Predictor` only, so the
torch model, an ONNX export and MuSc are served the same way; inference runs in the
service's single worker.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response

from anomalyclip.serving.dependencies import (
    Service,
    ServiceDep,
    merged,
    method_query,
    pixel_query,
    references_query,
    threshold_query,
)
from anomalyclip.serving.rendering import Rendered
from anomalyclip.serving.schemas import ERROR_RESPONSES, BatchResult, Prediction
from anomalyclip.serving.uploads import (
    Upload,
    UploadError,
    accept_upload,
    check_batch_size,
    check_set,
)

router = APIRouter()


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
) -> BatchResult:
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
) -> BatchResult:
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
) -> BatchResult:
    """Several uploads, a bad file failing alone; scored together when ``as_set`` or
    when the method's images score each other (then within the set limits)."""
    name, predictor = service.chosen(method, references)
    slots = await service.accept_all(files)
    uploads = [slot for slot in slots if isinstance(slot, Upload)]
    together = as_set or predictor.scores_sets
    if together:
        check_set(uploads, service.settings)
    outcomes = await service.analyse(request, name, predictor, uploads, threshold, pixel_threshold)
    return merged(slots, outcomes)
