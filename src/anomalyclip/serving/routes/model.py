"""What the page and clients need to know of a method before they send an image."""

from __future__ import annotations

from fastapi import APIRouter

import anomalyclip
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.serving.dependencies import (
    ServiceDep,
    method_query,
    references_query,
)
from anomalyclip.serving.schemas import Limits, ModelInfo, sanitised
from anomalyclip.serving.settings import ServiceSettings

router = APIRouter()


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
        false_alarm=post.false_alarm,
        map_range=post.map_range,
        architecture=identity.get("architecture") or None,
        settings=sanitised(method_settings),
        limits=Limits(**{name: getattr(settings, name) for name in Limits.model_fields}),
        version=anomalyclip.__version__,
    )


@router.get("/v1/model", response_model=ModelInfo, summary="A method's settings and limits")
async def describe(
    service: ServiceDep,
    method: str | None = method_query,
    references: str | None = references_query,
) -> ModelInfo:
    name, predictor = service.chosen(method, references)
    return model_info(
        name, predictor, service.thresholds(predictor), service.names, service.settings
    )
