"""Few-shot reference sets: known-good images kept in memory, later scored against by id.

The id is a digest of the method and the images, so the same upload gets the same id;
the service keeps only the most recently used sets (``max_reference_sets``).
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, File, Request, UploadFile

from anomalyclip.serving.costs import Work
from anomalyclip.serving.dependencies import (
    ServiceDep,
    client_of,
    left,
    method_query,
    upload_status,
)
from anomalyclip.serving.schemas import ERROR_RESPONSES, FailedImage, ReferenceSet
from anomalyclip.serving.uploads import Upload, check_set

router = APIRouter()


@router.post(
    "/v1/references",
    response_model=ReferenceSet,
    responses=ERROR_RESPONSES,
    summary="Keep known-good images to score later images against (few-shot)",
)
async def upload_references(
    request: Request,
    service: ServiceDep,
    files: list[UploadFile] = File(..., description="known-good images, 1 to 16 typically"),
    method: str | None = method_query,
) -> ReferenceSet:
    name, predictor = service.chosen(method)
    slots = await service.accept_all(files)
    uploads = [slot for slot in slots if isinstance(slot, Upload)]
    check_set(uploads, service.settings)
    digest = hashlib.sha256(name.encode())
    for upload in uploads:
        digest.update(hashlib.sha256(upload.data).digest())
    size = sum(len(upload.data) for upload in uploads)
    worker = service.worker
    few_shot, failures = await worker.run(
        worker.build_references,
        predictor,
        uploads,
        size=size,
        gone=left(request),
        work=Work(name, "references", len(uploads)),
        client=client_of(request),
    )
    identifier = digest.hexdigest()[:16]
    service.keep_references(identifier, name, few_shot)
    failed = [slot for slot in slots if isinstance(slot, FailedImage)] + [
        FailedImage(
            filename=uploads[index].filename, status=upload_status(error), detail=error.detail
        )
        for index, error in failures
    ]
    return ReferenceSet(
        id=identifier,
        method=name,
        count=len(uploads) - len(failures),
        failed=failed,
        bytes=few_shot.reference_bytes(),
    )
