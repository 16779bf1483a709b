"""AnomalyDINO's reference mode as the method registry calls it: the few-shot predictor
for known-good images, or for a bank saved earlier; and saving the bank a run used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalyclip.methods.anomalydino.model import AnomalyDINO, BatchedAnomalyDINO
from anomalyclip.methods.references import ReferenceError, bank_dtype
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
    """Write the bank a few-shot predictor scores with (``dtype`` float16 halves it), so
    that a later run loads it with ``--reference FILE.pt`` instead of re-encoding."""
    if not isinstance(predictor, AnomalyDINO):
        raise ReferenceError("AnomalyDINO has no reference bank here: give --reference images")
    return predictor.bank.save(path, bank_dtype(dtype))
