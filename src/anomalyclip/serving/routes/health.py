"""Liveness: reads the queue length only, never waiting on the worker, so it answers during
long scoring jobs."""

from __future__ import annotations

from fastapi import APIRouter

import anomalyclip
from anomalyclip.serving.dependencies import WorkerDep
from anomalyclip.serving.schemas import Health

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness and queue length")
async def healthz(worker: WorkerDep) -> Health:
    return Health(status="ok", pending=worker.pending, version=anomalyclip.__version__)
