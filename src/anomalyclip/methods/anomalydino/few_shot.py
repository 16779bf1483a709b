"""AnomalyDINO's reference mode as the method registry calls it: the few-shot predictor
for known-good images, or for a bank saved earlier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalyclip.methods.anomalydino.model import AnomalyDINO, BatchedAnomalyDINO
from anomalyclip.methods.references import ReferenceError
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import ImageSource


def _zero_shot(predictor: Predictor) -> BatchedAnomalyDINO:
    """The batched form under a few-shot one (new references replace the old)."""
    if isinstance(predictor, AnomalyDINO):
        return BatchedAnomalyDINO(predictor.backbone, predictor.config, predictor.identity)
    if not isinstance(predictor, BatchedAnomalyDINO):
        raise ReferenceError(f"references need AnomalyDINO itself, not {predictor.method}")
    return predictor


def references_for(predictor: Predictor, references: Sequence[ImageSource]) -> AnomalyDINO:
    """AnomalyDINO few-shot for these known-good images (the registry's entry point)."""
    return _zero_shot(predictor).with_references(list(references))


def bank_for(predictor: Predictor, path: str | Path) -> AnomalyDINO:
    """AnomalyDINO few-shot for a bank saved with :meth:`AnomalyDINOBank.save`."""
    return _zero_shot(predictor).with_references(Path(path))


def save_bank(predictor: Predictor, path: str | Path, dtype: str = "float32") -> Path:
    """The bank of a few-shot AnomalyDINO written to ``path`` (``calibrate`` keeps it beside
    its calibration file)."""
    if not isinstance(predictor, AnomalyDINO):
        raise ReferenceError(f"{predictor.method} holds no AnomalyDINO reference bank")
    return predictor.bank.save(path, dtype)
