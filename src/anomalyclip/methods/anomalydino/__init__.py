"""AnomalyDINO (Damm et al., WACV 2025): few-shot and batched zero-shot anomaly detection by
nearest DINOv2 patches. :mod:`.core` holds the numerics step by step, :mod:`.bank` the
reference bank, :mod:`.model` the :class:`~anomalyclip.predictor.Predictor` classes.
"""

from __future__ import annotations

from anomalyclip.methods.anomalydino.bank import AnomalyDINOBank, BankError
from anomalyclip.methods.anomalydino.model import (
    MAP_RANGE,
    AnomalyDINO,
    AnomalyDINOConfig,
    AnomalyDINOPreProcessor,
    AnomalyDINOResult,
    BatchedAnomalyDINO,
    build_anomalydino,
    create_anomalydino,
)

__all__ = [
    "MAP_RANGE",
    "AnomalyDINO",
    "AnomalyDINOBank",
    "AnomalyDINOConfig",
    "AnomalyDINOPreProcessor",
    "AnomalyDINOResult",
    "BankError",
    "BatchedAnomalyDINO",
    "build_anomalydino",
    "create_anomalydino",
]
