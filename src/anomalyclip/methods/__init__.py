"""Scoring methods beyond the AnomalyCLIP model, each a :class:`~anomalyclip.predictor.Predictor`.

:mod:`anomalyclip.methods.musc`: MuSc (Li et al., ICLR 2024), zero-shot, no prompts and
no training: the images of a set score each other with a frozen CLIP's patch features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anomalyclip.methods.musc import MuSc, MuScConfig, create_musc
from anomalyclip.predictor import Predictor

__all__ = ["METHODS", "MuSc", "MuScConfig", "create_musc", "create_predictor"]

# Builders by the name ``--method`` takes; each is called as
# builder(clip_weights, overrides=..., device=..., dtype=...).
# AnomalyCLIP itself is built by anomalyclip.factory.create_model (it has a checkpoint).
METHODS: dict[str, Callable[..., Predictor]] = {"musc": create_musc}


def create_predictor(method: str, clip_weights: Any = None, **options: Any) -> Predictor:
    """The registered method ``method``, built from a backbone and its settings."""
    try:
        builder = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown scoring method {method!r}; registered: {', '.join(METHODS)}"
        ) from None
    return builder(clip_weights, **options)
