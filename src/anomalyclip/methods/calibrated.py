"""Thresholds for methods without a checkpoint: the calibration file and its wrapper.

AnomalyCLIP keeps its calibrated thresholds in its checkpoint. MuSc and AnomalyDINO learn
nothing and have no checkpoint, so ``anomalyclip calibrate --method musc -o line3.json``
writes a small JSON **calibration file** instead: what was scored with (method,
configuration overrides, backbone name and checksum, tiles), the thresholds and what
they promise, and the reference bank they were calibrated with (a file beside it, named
relative to it, with its SHA-256). ``predict --calibration line3.json`` (or
``--checkpoint line3.json``) and ``serve`` apply it through
:func:`anomalyclip.methods.assemble.assemble`, which rebuilds the method from the file,
recomputes the bank file's checksum from its content and refuses one that differs, and
wraps the result in :class:`CalibratedPredictor`, whose post-processor carries the
thresholds.

Thresholds are on the method's own score scale: MuSc's is a raw patch distance (its
image score is the maximum of the map; good parts of one product mostly fall in a
narrow band, well under 1), AnomalyDINO's a cosine distance.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import PreProcessor
from anomalyclip.utils.atomic import atomic_write_text
from anomalyclip.utils.hashing import file_digest

__all__ = [
    "CALIBRATION_FORMAT",
    "CalibratedPredictor",
    "CalibrationFile",
    "CalibrationFileError",
    "calibrated",
    "is_calibration_file",
]

CALIBRATION_FORMAT = "anomalyclip-calibration"
CALIBRATION_VERSION = 1


class CalibrationFileError(ValueError):
    """A calibration file that cannot be used: unreadable, damaged, or its bank changed."""


@dataclass(frozen=True)
class CalibrationFile:
    """What ``calibrate`` writes for a method without a checkpoint (see module notes)."""

    method: str
    image_threshold: float
    pixel_threshold: float
    overrides: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # as given at calibration: a registered name or a file
    backbone_sha256: str | None = None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    bank: str | None = None  # file name, relative to the calibration file
    bank_sha256: str | None = None
    false_alarm: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        record = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION}
        record.update(dataclasses.asdict(self))
        target = Path(path)
        atomic_write_text(target, json.dumps(record, indent=2, allow_nan=False) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> CalibrationFile:
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CalibrationFileError(f"{source}: not a calibration file ({error})") from None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise CalibrationFileError(f"{source}: not a calibration file written by anomalyclip")
        if data.get("version") != CALIBRATION_VERSION:
            raise CalibrationFileError(
                f"{source}: calibration file version {data.get('version')!r}; this "
                f"anomalyclip reads version {CALIBRATION_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            loaded = cls(**{k: v for k, v in data.items() if k in known})
            for name in ("image_threshold", "pixel_threshold"):
                if not np.isfinite(float(getattr(loaded, name))):
                    raise ValueError(f"{name} is not finite")
        except (TypeError, ValueError) as error:
            raise CalibrationFileError(f"{source}: damaged calibration file ({error})") from None
        return loaded

    def bank_path(self, path: str | Path) -> Path | None:
        """The bank beside the calibration file, its checksum recomputed from its content:
        a bank replaced or changed since calibration is refused, not used."""
        if self.bank is None:
            return None
        bank = Path(path).parent / Path(self.bank).name
        if not bank.is_file():
            raise CalibrationFileError(
                f"{path} was calibrated with the reference bank {bank}, which is missing"
            )
        if file_digest(bank) != self.bank_sha256:
            raise CalibrationFileError(
                f"{bank} is not the reference bank {path} was calibrated with (its SHA-256 "
                "differs): calibrate again"
            )
        return bank

    def postprocessor(self, map_range: tuple[float, float]) -> PostProcessor:
        return PostProcessor.calibrated(
            map_range, self.image_threshold, self.pixel_threshold, self.false_alarm
        )


def is_calibration_file(path: str | Path | None) -> bool:
    """Whether ``path`` is a file whose content starts like a calibration file (a JSON
    object naming the format); checkpoints and registered names are not."""
    if path is None or not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and CALIBRATION_FORMAT.encode() in head


class CalibratedPredictor(Predictor):
    """A method (with its references and tiles) and the thresholds of a calibration
    file: everything is the inner predictor's except the post-processor."""

    def __init__(self, inner: Predictor, calibration: CalibrationFile) -> None:
        self.inner = inner
        self.calibration = calibration
        self.method = inner.method

    def decodes_full_resolution(self) -> bool:
        return self.inner.decodes_full_resolution()

    def layers(self) -> tuple[Predictor, Callable[[Predictor], Predictor]]:
        # references given later (the service) make other scores: the thresholds, made
        # for the calibrated bank, are not carried over to them
        return self.inner.layers()

    @property
    def preprocessor(self) -> PreProcessor:
        return self.inner.preprocessor

    @property
    def postprocessor(self) -> PostProcessor:
        return self.calibration.postprocessor(self.inner.postprocessor.map_range)

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "calibration": self.calibration.details}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.score_tensors(images)

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        post = self.postprocessor
        predictions = self.inner.predict_images(images)
        for prediction in predictions:
            prediction.postprocessor = post
        return predictions


class CalibratedSetPredictor(CalibratedPredictor):
    """The same for a method whose images score each other."""

    scores_sets: ClassVar[bool] = True


def calibrated(inner: Predictor, calibration: CalibrationFile) -> CalibratedPredictor:
    """``inner`` with the thresholds of ``calibration``."""
    kind = CalibratedSetPredictor if inner.scores_sets else CalibratedPredictor
    return kind(inner, calibration)


def recorded_backbone(settings: Mapping[str, Any]) -> str | None:
    """The backbone checksum a method's settings record (every method records one)."""
    identity = settings.get("backbone_identity") or {}
    value = identity.get("sha256") if isinstance(identity, Mapping) else None
    return None if value is None else str(value)
