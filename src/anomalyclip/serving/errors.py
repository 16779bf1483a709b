"""Domain errors become HTTP statuses here and nowhere else, each as the same JSON error.

:mod:`~anomalyclip.serving.uploads`, :mod:`~anomalyclip.serving.worker` and the scoring
methods raise their own exceptions, knowing nothing of HTTP; the table at the end maps
each to its handler, and :func:`~anomalyclip.serving.app.create_app` installs it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from anomalyclip.methods.references import ReferenceError
from anomalyclip.predictor import NonFiniteScoreError
from anomalyclip.serving.dependencies import upload_status
from anomalyclip.serving.guards import error_response
from anomalyclip.serving.uploads import UploadError
from anomalyclip.serving.worker import ClientGone, InferenceTimeout, ServiceBusy

logger = logging.getLogger(__name__)


async def invalid_request(_: Request, error: RequestValidationError) -> Response:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
    )
    return error_response(422, f"invalid request: {problems}")


async def refused_upload(_: Request, error: UploadError) -> Response:
    return error_response(upload_status(error), error.detail)


async def busy(_: Request, error: ServiceBusy) -> Response:
    return error_response(503, str(error), headers={"Retry-After": "1"})


async def timed_out(_: Request, error: InferenceTimeout) -> Response:
    return error_response(504, str(error))


async def no_verdict(_: Request, error: NonFiniteScoreError) -> Response:
    logger.error("%s", error)
    return error_response(500, f"{error}; no verdict given")


async def client_left(_: Request, error: ClientGone) -> Response:
    return error_response(499, str(error))  # nobody reads it: the connection is closed


async def unusable_references(_: Request, error: ReferenceError) -> Response:
    return error_response(422, str(error))


async def unexpected(_: Request, error: Exception) -> Response:
    logger.exception("request failed")
    return error_response(500, f"internal error ({type(error).__name__})")


# exception type -> its handler; Exception last, for whatever nothing above expected
EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    RequestValidationError: invalid_request,
    UploadError: refused_upload,
    ServiceBusy: busy,
    InferenceTimeout: timed_out,
    NonFiniteScoreError: no_verdict,
    ClientGone: client_left,
    ReferenceError: unusable_references,
    Exception: unexpected,
}
