"""The HTTP routes: scoring methods loaded once, inference in a single worker, a browser page.

Nothing in a request ever names a file on the server: uploads are decoded from memory,
and the page and its scripts are read from package data at start-up and served from a
fixed table. The routes are written against :class:`~anomalyclip.predictor.Predictor`
only, so the torch model, an ONNX export and MuSc are served the same way. Domain errors
(:mod:`~anomalyclip.serving.uploads`, :mod:`~anomalyclip.serving.worker`) become HTTP
statuses here and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

import anomalyclip
from anomalyclip.methods.references import ReferenceError
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import NonFiniteScoreError, Predictor
from anomalyclip.serving.guards import RequestGuard, UploadRoute, error_response
from anomalyclip.serving.rendering import Rendered
from anomalyclip.serving.schemas import (
    ERROR_RESPONSES,
    BatchResult,
    FailedImage,
    Health,
    Limits,
    ModelInfo,
    Prediction,
    ReferenceSet,
    sanitised,
)
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import (
    InvalidUpload,
    TooFewImages,
    UnsupportedUpload,
    Upload,
    UploadError,
    UploadTooLarge,
    accept_upload,
    check_batch_size,
    check_set,
    display_name,
)
from anomalyclip.serving.worker import (
    ClientGone,
    InferenceTimeout,
    InferenceWorker,
    Outcome,
    ServiceBusy,
)

logger = logging.getLogger(__name__)

MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries and part headers around the file bytes
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
UPLOAD_STATUS: dict[type[UploadError], int] = {
    UploadTooLarge: 413,
    UnsupportedUpload: 415,
    InvalidUpload: 422,
    TooFewImages: 422,
}


def upload_status(error: UploadError) -> int:
    return UPLOAD_STATUS.get(type(error), 422)


def left(request: Request) -> Callable[[], Awaitable[object]]:
    """What returns once the client has closed its connection (its body already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def load_static() -> dict[str, bytes]:
    folder = resources.files("anomalyclip.serving") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def as_methods(predictors: Predictor | Mapping[str, Predictor]) -> dict[str, Predictor]:
    """Method name -> predictor, the first being the default; names must be unique."""
    if isinstance(predictors, Predictor):
        return {predictors.method: predictors}
    methods = dict(predictors)
    if not methods:
        raise ValueError("the service needs at least one scoring method")
    return methods


def model_info(
    name: str,
    predictor: Predictor,
    post: PostProcessor,
    methods: list[str],
    settings: ServiceSettings,
) -> ModelInfo:
    """What the page and clients need to know of one method, from its description only."""
    description = predictor.describe()
    method_settings = description["settings"]
    identity = method_settings.get("backbone_identity") or {}
    features = method_settings.get("features")
    return ModelInfo(
        method=name,
        methods=methods,
        scores_sets=predictor.scores_sets,
        backbone=sanitised(method_settings.get("backbone") or identity.get("name")),
        backbone_sha256=identity.get("sha256"),
        image_size=description["image_size"],
        features=None if features is None else [int(layer) for layer in features],
        image_threshold=post.image_threshold,
        image_threshold_source=post.image_threshold_source,
        pixel_threshold=post.pixel_threshold,
        pixel_threshold_source=post.pixel_threshold_source,
        map_range=post.map_range,
        architecture=identity.get("architecture") or None,
        settings=sanitised(method_settings),
        limits=Limits(**{name: getattr(settings, name) for name in Limits.model_fields}),
        version=anomalyclip.__version__,
    )


def create_app(
    predictors: Predictor | Mapping[str, Predictor], settings: ServiceSettings | None = None
) -> FastAPI:
    """The service around already loaded scoring methods; run it with any ASGI server.

    ``predictors``: one :class:`Predictor`, or several by name (the first is the default,
    and a request picks another with ``?method=NAME``). The service's thresholds
    (``settings``) override each method's calibrated ones, and a request's override both.
    """
    settings = settings or ServiceSettings()
    methods = as_methods(predictors)
    names = list(methods)
    for predictor in methods.values():
        eval_mode = getattr(predictor, "eval", None)
        if callable(eval_mode):
            eval_mode()
    worker = InferenceWorker(settings)
    # reference sets uploaded by clients: id -> (method, its few-shot predictor), LRU
    reference_sets: OrderedDict[str, tuple[str, Predictor]] = OrderedDict()
    static = load_static()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(
        title="anomalyclip",
        version=anomalyclip.__version__,
        description="Zero-shot anomaly detection: upload images, get scores, verdicts, "
        "heatmap overlays and defect masks. Methods: " + ", ".join(names) + ".",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.settings = settings
    app.state.methods = methods
    app.state.reference_sets = reference_sets
    per_file = settings.max_upload_bytes + MULTIPART_SLACK_BYTES
    app.add_middleware(
        RequestGuard,
        settings=settings,
        routes={
            "/v1/predict": UploadRoute(per_file, 1),
            "/v1/predict/batch": UploadRoute(
                per_file * settings.max_batch_size, settings.max_batch_size
            ),
            "/v1/predict/set": UploadRoute(per_file * settings.max_set_size, settings.max_set_size),
            "/v1/references": UploadRoute(per_file * settings.max_set_size, settings.max_set_size),
        },
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return error_response(422, f"invalid request: {problems}")

    @app.exception_handler(UploadError)
    async def refused_upload(_: Request, error: UploadError) -> Response:
        return error_response(upload_status(error), error.detail)

    @app.exception_handler(ServiceBusy)
    async def busy(_: Request, error: ServiceBusy) -> Response:
        return error_response(503, str(error), headers={"Retry-After": "1"})

    @app.exception_handler(InferenceTimeout)
    async def timed_out(_: Request, error: InferenceTimeout) -> Response:
        return error_response(504, str(error))

    @app.exception_handler(NonFiniteScoreError)
    async def no_verdict(_: Request, error: NonFiniteScoreError) -> Response:
        logger.error("%s", error)
        return error_response(500, f"{error}; no verdict given")

    @app.exception_handler(ClientGone)
    async def client_left(_: Request, error: ClientGone) -> Response:
        return error_response(499, str(error))  # nobody reads it: the connection is closed

    @app.exception_handler(ReferenceError)
    async def unusable_references(_: Request, error: ReferenceError) -> Response:
        return error_response(422, str(error))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        logger.exception("request failed")
        return error_response(500, f"internal error ({type(error).__name__})")

    def chosen(method: str | None, references: str | None = None) -> tuple[str, Predictor]:
        """The method a request names (default: the first), or its reference set's."""
        if references is not None:
            if references not in reference_sets:
                raise HTTPException(
                    404,
                    f"no reference set {references!r} here (the service keeps the last "
                    f"{settings.max_reference_sets}); upload the references again",
                )
            reference_sets.move_to_end(references)
            name, predictor = reference_sets[references]
            if method is not None and method != name:
                raise HTTPException(422, f"reference set {references} is for {name}, not {method}")
            return name, predictor
        name = method or names[0]
        if name not in methods:
            raise HTTPException(
                422, f"unknown method {name!r}; this service offers {', '.join(names)}"
            )
        return name, methods[name]

    def thresholds(predictor: Predictor) -> PostProcessor:
        """The method's calibrated thresholds, overridden by the service's."""
        return predictor.postprocessor.with_given(
            settings.image_threshold, settings.pixel_threshold
        )

    async def analyse(
        request: Request,
        name: str,
        predictor: Predictor,
        uploads: list[Upload],
        threshold: float | None,
        pixel_threshold: float | None,
        as_set: bool,
    ) -> list[Outcome]:
        post = thresholds(predictor).with_given(threshold, pixel_threshold)
        started = time.perf_counter()
        size = sum(len(upload.data) for upload in uploads)
        outcomes: list[Outcome] = await worker.run(
            worker.analyse, predictor, uploads, post, as_set, size=size, gone=left(request)
        )
        logger.debug(
            "%s: %d image(s) in %.0f ms", name, len(uploads), 1e3 * (time.perf_counter() - started)
        )
        return outcomes

    async def accept_all(files: list[UploadFile]) -> list[Upload | FailedImage]:
        slots: list[Upload | FailedImage] = []
        for file in files:
            try:
                slots.append(await accept_upload(file, settings))
            except UploadError as error:
                slots.append(
                    FailedImage(
                        filename=display_name(file.filename),
                        status=upload_status(error),
                        detail=error.detail,
                    )
                )
        return slots

    def merged(slots: list[Upload | FailedImage], outcomes: list[Outcome]) -> BatchResult:
        remaining = iter(outcomes)
        results: list[Prediction | FailedImage] = []
        for slot in slots:
            if isinstance(slot, FailedImage):
                results.append(slot)
                continue
            outcome = next(remaining)
            if isinstance(outcome, UploadError):
                results.append(
                    FailedImage(
                        filename=slot.filename, status=upload_status(outcome), detail=outcome.detail
                    )
                )
            else:
                results.append(outcome.prediction)
        failed = sum(isinstance(item, FailedImage) for item in results)
        return BatchResult(results=results, succeeded=len(results) - failed, failed=failed)

    method_query = Query(None, description="scoring method (default: the service's first)")
    references_query = Query(
        None, description="score against a reference set uploaded to /v1/references"
    )
    threshold_query = Query(
        None, allow_inf_nan=False, description="image threshold (default: the method's)"
    )
    pixel_query = Query(None, allow_inf_nan=False, description="mask threshold, in the map's units")

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
        request: Request,
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
        name, predictor = chosen(method, references)
        if predictor.scores_sets:
            raise HTTPException(
                422,
                f"{name} scores the images of a set against each other; send at least two "
                "images to /v1/predict/set",
            )
        upload = await accept_upload(file, settings)
        (outcome,) = await analyse(
            request, name, predictor, [upload], threshold, pixel_threshold, as_set=False
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

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResult,
        responses=ERROR_RESPONSES,
        summary="Score several images, each on its own; a bad file fails alone",
    )
    async def predict_batch(
        request: Request,
        files: list[UploadFile] = File(..., description="the images"),
        method: str | None = method_query,
        references: str | None = references_query,
        threshold: float | None = threshold_query,
        pixel_threshold: float | None = pixel_query,
    ) -> BatchResult:
        check_batch_size(len(files), settings)
        return await score_all(
            request, files, method, references, threshold, pixel_threshold, False
        )

    @app.post(
        "/v1/predict/set",
        response_model=BatchResult,
        responses=ERROR_RESPONSES,
        summary="Score a set of images together (MuSc: they score each other)",
    )
    async def predict_set(
        request: Request,
        files: list[UploadFile] = File(..., description="the images of one set"),
        method: str | None = method_query,
        references: str | None = references_query,
        threshold: float | None = threshold_query,
        pixel_threshold: float | None = pixel_query,
    ) -> BatchResult:
        return await score_all(request, files, method, references, threshold, pixel_threshold, True)

    async def score_all(
        request: Request,
        files: list[UploadFile],
        method: str | None,
        references: str | None,
        threshold: float | None,
        pixel_threshold: float | None,
        as_set: bool,
    ) -> BatchResult:
        """Several uploads, a bad file failing alone; scored together when ``as_set`` or
        when the method's images score each other (then within the set limits)."""
        name, predictor = chosen(method, references)
        slots = await accept_all(files)
        uploads = [slot for slot in slots if isinstance(slot, Upload)]
        together = as_set or predictor.scores_sets
        if together:
            check_set(uploads, settings)
        outcomes = await analyse(
            request, name, predictor, uploads, threshold, pixel_threshold, together
        )
        return merged(slots, outcomes)

    @app.post(
        "/v1/references",
        response_model=ReferenceSet,
        responses=ERROR_RESPONSES,
        summary="Keep known-good images to score later images against (few-shot)",
    )
    async def upload_references(
        request: Request,
        files: list[UploadFile] = File(..., description="known-good images, 1 to 16 typically"),
        method: str | None = method_query,
    ) -> ReferenceSet:
        name, predictor = chosen(method)
        slots = await accept_all(files)
        uploads = [slot for slot in slots if isinstance(slot, Upload)]
        check_set(uploads, settings)
        digest = hashlib.sha256(name.encode())
        for upload in uploads:
            digest.update(hashlib.sha256(upload.data).digest())
        size = sum(len(upload.data) for upload in uploads)
        few_shot, failures = await worker.run(
            worker.build_references, predictor, uploads, size=size, gone=left(request)
        )
        identifier = digest.hexdigest()[:16]
        reference_sets[identifier] = (name, few_shot)
        reference_sets.move_to_end(identifier)
        while len(reference_sets) > settings.max_reference_sets:
            reference_sets.popitem(last=False)
        failed = [slot for slot in slots if isinstance(slot, FailedImage)] + [
            FailedImage(
                filename=uploads[index].filename, status=upload_status(error), detail=error.detail
            )
            for index, error in failures
        ]
        bank = getattr(few_shot, "bank", None)
        return ReferenceSet(
            id=identifier,
            method=name,
            count=len(uploads) - len(failures),
            failed=failed,
            bytes=0 if bank is None else bank.nbytes,
        )

    @app.get("/healthz", response_model=Health, summary="Liveness and queue length")
    async def healthz() -> Health:
        return Health(status="ok", pending=worker.pending, version=anomalyclip.__version__)

    @app.get("/v1/model", response_model=ModelInfo, summary="A method's settings and limits")
    async def describe(
        method: str | None = method_query, references: str | None = references_query
    ) -> ModelInfo:
        name, predictor = chosen(method, references)
        return model_info(name, predictor, thresholds(predictor), names, settings)

    def static_route(name: str) -> Callable[[], Awaitable[Response]]:
        async def serve_static() -> Response:
            return Response(static[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

        return serve_static

    app.get("/", include_in_schema=False)(static_route("index.html"))
    for name in ("app.js", "style.css"):
        app.get(f"/static/{name}", include_in_schema=False)(static_route(name))
    return app
