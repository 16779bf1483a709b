"""The service: scoring methods loaded once, inference in a single worker, a browser page.

Nothing in a request ever names a file on the server: uploads are decoded from memory,
and the page and its scripts are read from package data at start-up and served from a
fixed table. :func:`create_app` only assembles the parts: it stores the shared state on
``app.state`` (read by the routes through :mod:`~anomalyclip.serving.dependencies`),
installs the request guard and the error handlers (:mod:`~anomalyclip.serving.errors`,
where domain errors become HTTP statuses) and includes the routers
(:mod:`anomalyclip.serving.routes`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

import anomalyclip
from anomalyclip.inspection.bank import AuditLog
from anomalyclip.predictor import Predictor
from anomalyclip.serving.dependencies import ReferenceSets
from anomalyclip.serving.errors import EXCEPTION_HANDLERS
from anomalyclip.serving.guards import RequestGuard, UploadRoute
from anomalyclip.serving.routes import health, model, page, predict, references, streams
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.worker import InferenceWorker

MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries and part headers around the file bytes


def as_methods(predictors: Predictor | Mapping[str, Predictor]) -> dict[str, Predictor]:
    """Method name -> predictor, the first being the default; names must be unique."""
    if isinstance(predictors, Predictor):
        return {predictors.method: predictors}
    methods = dict(predictors)
    if not methods:
        raise ValueError("the service needs at least one scoring method")
    return methods


def upload_routes(settings: ServiceSettings) -> dict[str, UploadRoute]:
    """The upload routes' body and file-count limits, enforced before a body is read."""
    per_file = settings.max_upload_bytes + MULTIPART_SLACK_BYTES
    per_set = UploadRoute(per_file * settings.max_set_size, settings.max_set_size)
    return {
        "/v1/predict": UploadRoute(per_file, 1),
        "/v1/predict/batch": UploadRoute(
            per_file * settings.max_batch_size, settings.max_batch_size
        ),
        "/v1/predict/set": per_set,
        "/v1/references": per_set,
    }


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
    for predictor in methods.values():
        eval_mode = getattr(predictor, "eval", None)
        if callable(eval_mode):
            eval_mode()
    worker = InferenceWorker(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(
        title="anomalyclip",
        version=anomalyclip.__version__,
        description="Zero-shot anomaly detection: upload images, get scores, verdicts, "
        "heatmap overlays and defect masks. Methods: " + ", ".join(methods) + ".",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.settings = settings
    app.state.methods = methods
    app.state.reference_sets = ReferenceSets()
    app.state.static = page.load_static()
    app.state.streams = {}  # name -> Stream (routes/streams.py)
    app.state.audit = AuditLog(Path(settings.audit_log) if settings.audit_log else None)
    app.add_middleware(RequestGuard, settings=settings, routes=upload_routes(settings))
    for error, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(error, handler)
    for routes in (predict, references, streams, health, model, page):
        app.include_router(routes.router)
    return app
