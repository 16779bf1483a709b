"""Building MuSc: the backbone resolved by name, file or checksum (CLIP, or DINOv2 as the
official code's DINOv2 branch), the settings checked; and the one-line ``score_set``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.dinov2_layouts import is_dinov2_weights
from anomalyclip.methods.musc.dinov2 import create_musc_dinov2
from anomalyclip.methods.musc.model import MuSc, MuScConfig, configured
from anomalyclip.predictor import AnomalyPrediction, SkippedImage
from anomalyclip.preprocess import ImageSource

__all__ = ["create_musc", "score_set"]


def create_musc(
    clip_weights: str | Path | CLIP | None = None,
    *,
    config: MuScConfig | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MuSc:
    """MuSc in one call, as :func:`~anomalyclip.methods.anomalyclip.model.create_model` builds
    AnomalyCLIP.

    ``clip_weights``: a registered name, a file or folder, or a CLIP in memory; default:
    ``config.backbone`` (the registered ViT-L/14@336px, MuSc's published backbone). A
    DINOv2 file or folder (official, timm or Hugging Face layout) gives MuSc on DINOv2.
    ``overrides``: :class:`MuScConfig` fields; None values mean "not given". The
    backbone goes through the factory's resolution (registry, cache, checksum), so the
    results record its name and SHA-256.
    """
    settings = configured(config, overrides)
    if isinstance(clip_weights, (str, Path)) and is_dinov2_weights(clip_weights):
        # the official code's DINOv2 branch: the same scoring on DINOv2's features
        return create_musc_dinov2(clip_weights, settings, device=device, dtype=dtype)
    return MuSc.from_pretrained(clip_weights, config=settings, device=device, dtype=dtype)


def score_set(
    sources: str | Path | Sequence[ImageSource],
    clip_weights: str | Path | CLIP | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **settings: Any,
) -> list[AnomalyPrediction | SkippedImage]:
    """MuSc in one line: a folder or a list of images scored as one set, in input order.

    ``settings`` are :class:`MuScConfig` fields (``degrees=(1, 3)``, ``image_size=...``);
    to score several sets, build the model once with :func:`create_musc` and call its
    :meth:`MuSc.score_set`, as loading the backbone is the slow part.
    """
    model = create_musc(clip_weights, overrides=settings, device=device)
    return model.score_set(sources, progress=progress)
