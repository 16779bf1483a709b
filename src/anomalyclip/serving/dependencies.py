"""What the routes share: the service's state, read from ``app.state``, and its helpers.

:func:`~anomalyclip.serving.app.create_app` stores the worker, the settings, the methods
by name and the reference-set store on ``app.state`` once; a route asks for them with
``Depends`` instead of closing over them, so the routes live in their own modules
(:mod:`anomalyclip.serving.routes`) and this module imports none of them. The
dependencies only read state and take no parameters of their own: a request's query
parameters stay on the routes, so the HTTP API and its schema do not depend on how the
code is split. They are ``async`` so that FastAPI runs them inline, not in a thread.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, UploadFile

from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.serving.costs import Work
from anomalyclip.serving.rendering import Rendered, Scored
from anomalyclip.serving.schemas import FailedImage
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import (
    InvalidUpload,
    TooFewImages,
    UnsupportedUpload,
    Upload,
    UploadError,
    UploadTooLarge,
    accept_upload,
    display_name,
)
from anomalyclip.serving.worker import InferenceWorker, Outcome

logger = logging.getLogger(__name__)

# reference sets uploaded by clients: id -> (method, its few-shot predictor), LRU order
ReferenceSets = OrderedDict[str, tuple[str, Predictor]]

UPLOAD_STATUS: dict[type[UploadError], int] = {
    UploadTooLarge: 413,
    UnsupportedUpload: 415,
    InvalidUpload: 422,
    TooFewImages: 422,
}

method_query = Query(None, description="scoring method (default: the service's first)")
references_query = Query(
    None, description="score against a reference set uploaded to /v1/references"
)
threshold_query = Query(
    None, allow_inf_nan=False, description="image threshold (default: the method's)"
)
pixel_query = Query(None, allow_inf_nan=False, description="mask threshold, in the map's units")


def upload_status(error: UploadError) -> int:
    return UPLOAD_STATUS.get(type(error), 422)


def left(request: Request) -> Callable[[], Awaitable[object]]:
    """What returns once the client has closed its connection (its body already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def client_of(request: Request) -> str:
    """Whose share of the worker a request takes: its client's address."""
    return request.client.host if request.client is not None else ""


@dataclass(frozen=True)
class Service:
    """The state every scoring route needs, and what the routes do with it alike."""

    worker: InferenceWorker
    settings: ServiceSettings
    methods: dict[str, Predictor]  # the first is the default
    reference_sets: ReferenceSets

    @property
    def names(self) -> list[str]:
        return list(self.methods)

    def chosen(self, method: str | None, references: str | None = None) -> tuple[str, Predictor]:
        """The method a request names (default: the first), or its reference set's."""
        if references is not None:
            if references not in self.reference_sets:
                raise HTTPException(
                    404,
                    f"no reference set {references!r} here (the service keeps the last "
                    f"{self.settings.max_reference_sets}); upload the references again",
                )
            self.reference_sets.move_to_end(references)
            name, predictor = self.reference_sets[references]
            if method is not None and method != name:
                raise HTTPException(422, f"reference set {references} is for {name}, not {method}")
            return name, predictor
        names = self.names
        name = method or names[0]
        if name not in self.methods:
            raise HTTPException(
                422, f"unknown method {name!r}; this service offers {', '.join(names)}"
            )
        return name, self.methods[name]

    def thresholds(self, predictor: Predictor) -> PostProcessor:
        """The method's calibrated thresholds, overridden by the service's."""
        return predictor.postprocessor.with_given(
            self.settings.image_threshold, self.settings.pixel_threshold
        )

    def keep_references(self, identifier: str, name: str, few_shot: Predictor) -> None:
        """Store a reference set as the most recent, dropping the least recently used."""
        self.reference_sets[identifier] = (name, few_shot)
        self.reference_sets.move_to_end(identifier)
        while len(self.reference_sets) > self.settings.max_reference_sets:
            self.reference_sets.popitem(last=False)

    async def analyse(
        self,
        request: Request,
        name: str,
        predictor: Predictor,
        uploads: list[Upload],
        threshold: float | None,
        pixel_threshold: float | None,
        deferred: bool = False,
    ) -> list[Outcome]:
        """Score the uploads on the worker; ``deferred``: rendered later, when sent."""
        post = self.thresholds(predictor).with_given(threshold, pixel_threshold)
        work = Work(name, "set" if predictor.scores_sets else "images", len(uploads))
        started = time.perf_counter()
        size = sum(len(upload.data) for upload in uploads)
        worker = self.worker
        outcomes: list[Outcome] = await worker.run(
            worker.analyse,
            predictor,
            uploads,
            post,
            deferred,
            size=size,
            gone=left(request),
            work=work,
            client=client_of(request),
        )
        logger.debug(
            "%s: %d image(s) in %.0f ms", name, len(uploads), 1e3 * (time.perf_counter() - started)
        )
        return outcomes

    async def accept_all(self, files: list[UploadFile]) -> list[Upload | FailedImage]:
        """Each upload decoded, or its failure in its place: a bad file fails alone."""
        slots: list[Upload | FailedImage] = []
        for file in files:
            try:
                slots.append(await accept_upload(file, self.settings))
            except UploadError as error:
                slots.append(
                    FailedImage(
                        filename=display_name(file.filename),
                        status=upload_status(error),
                        detail=error.detail,
                    )
                )
        return slots


def merged(
    slots: list[Upload | FailedImage], outcomes: list[Outcome]
) -> list[Rendered | Scored | FailedImage]:
    """The outcomes of the accepted uploads put back among the refused ones, in order."""
    remaining = iter(outcomes)
    results: list[Rendered | Scored | FailedImage] = []
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
            results.append(outcome)
    return results


async def current_service(request: Request) -> Service:
    state = request.app.state
    return Service(
        worker=state.worker,
        settings=state.settings,
        methods=state.methods,
        reference_sets=state.reference_sets,
    )


async def current_worker(request: Request) -> InferenceWorker:
    worker: InferenceWorker = request.app.state.worker
    return worker


async def static_files(request: Request) -> dict[str, bytes]:
    """The page and its scripts, read from package data once, at start-up."""
    static: dict[str, bytes] = request.app.state.static
    return static


ServiceDep = Annotated[Service, Depends(current_service)]
WorkerDep = Annotated[InferenceWorker, Depends(current_worker)]
StaticDep = Annotated[dict[str, bytes], Depends(static_files)]
