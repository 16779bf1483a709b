"""The scoring-method seam: what every method offers and every workflow relies on.

A scoring method (AnomalyCLIP's prompts in torch, the same model in ONNX Runtime, MuSc's
mutual scoring, ...) is a :class:`Predictor`: it owns a
:class:`~anomalyclip.preprocess.PreProcessor` (images to tensors and maps back) and a
:class:`~anomalyclip.postprocess.PostProcessor` (map range and thresholds), and turns a
batch of preprocessed images into scores and maps with :meth:`Predictor.score_tensors`.
Everything else (decoding, batching, skipping unreadable files, building
:class:`AnomalyPrediction` objects) is this one loop, shared by all methods. A method that
needs the whole set at once (its images score each other) sets ``scores_sets``; the loop
then hands it every image in one call.

The workflows (``inspect``, evaluation, calibration), the CLI and the service are written
against this interface only. A score or map holding NaN or infinity is never a result: it
raises :class:`NonFiniteScoreError` (a NaN compares as "normal" against any threshold).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from anomalyclip.postprocess import NonFiniteScoreError, PostProcessor
from anomalyclip.preprocess import (
    ImageLoadError,
    ImageSource,
    PreProcessor,
    describe,
    load_image,
    original_size,
)

ErrorPolicy = Literal["raise", "skip"]

__all__ = [
    "AnomalyPrediction",
    "ErrorPolicy",
    "NonFiniteScoreError",
    "PathScorer",
    "Predictor",
    "SkippedImage",
    "check_finite",
]


def check_finite(method: str, image: str, score: float, anomaly_map: np.ndarray) -> None:
    """Raise :class:`NonFiniteScoreError` naming the method and the image if ``score`` or
    ``anomaly_map`` holds NaN or infinity: damaged weights, never a verdict."""
    if not math.isfinite(score) or not np.isfinite(anomaly_map).all():
        raise NonFiniteScoreError(
            f"{method} produced a non-finite score or map for {image}; the model's weights "
            "(or a checkpoint's values) are damaged"
        )


@dataclass
class SkippedImage:
    """An input that could not be scored, and why."""

    image: str
    reason: str

    def to_record(self) -> dict[str, str]:
        return {"image": self.image, "reason": self.reason}


@dataclass
class AnomalyPrediction:
    """One image's result, with what is needed to map it back onto the original.

    ``preprocessor`` knows the geometry between the original and the model's input;
    ``postprocessor`` the map range and the thresholds in force.
    """

    source: str
    score: float
    anomaly_map: np.ndarray  # (S, S) float32 at model resolution
    original_size: tuple[int, int]  # (width, height)
    preprocessor: PreProcessor | None = None
    postprocessor: PostProcessor = field(default_factory=PostProcessor)

    def __post_init__(self) -> None:
        check_finite("the model", self.source, self.score, self.anomaly_map)

    @property
    def threshold(self) -> float | None:
        return self.postprocessor.image_threshold

    @property
    def map_range(self) -> tuple[float, float]:
        return self.postprocessor.map_range

    @property
    def is_anomalous(self) -> bool | None:
        return self.postprocessor.verdict(self.score)

    def map_at_original_size(self) -> np.ndarray:
        """(height, width) float32: the map placed on the input image, bilinearly."""
        preprocessor = self.preprocessor or PreProcessor(self.anomaly_map.shape[-1])
        return preprocessor.map_to_original(
            self.anomaly_map, self.original_size, fill=self.map_range[0]
        )


class PathScorer(Protocol):
    """A method's own engine for scoring files by path, reusing work between calls and
    runs (AnomalyCLIP: encoded images kept in a feature cache). ``category`` names the
    images' class, for methods whose scoring depends on it (object-aware prompts)."""

    def score_paths(
        self, paths: Sequence[str | Path], category: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and maps (B, S, S), as :meth:`Predictor.score_tensors` gives them."""
        ...


class Predictor(ABC):
    """A scoring method: preprocessed images in, image scores and pixel maps out."""

    method: str = "unnamed"  # a class attribute; wrappers set their inner method's
    scores_sets: ClassVar[bool] = False  # True: the images of a call score each other

    @property
    @abstractmethod
    def preprocessor(self) -> PreProcessor: ...

    @property
    @abstractmethod
    def postprocessor(self) -> PostProcessor: ...

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The configuration recorded with every result (JSON-ready)."""

    @abstractmethod
    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and maps (B, S, S), float32 numpy, for preprocessed (B, 3, S, S)."""

    def layers(self) -> tuple[Predictor, Callable[[Predictor], Predictor]]:
        """The method under any wrappers (tiles), and how to wrap another the same way:
        references given later apply to the method itself, then the wrappers again."""
        return self, lambda method: method

    def decodes_full_resolution(self) -> bool:
        """Whether the method needs every pixel of an image (tiles cut it at full size);
        otherwise a large file may be decoded reduced to what its input and a bounded
        overlay need (``anomalyclip predict``)."""
        return False

    def reference_views(self, references: Sequence[ImageSource]) -> Sequence[ImageSource]:
        """The references as this predictor's method must see them to compare like with
        like: as they are, unless a wrapper changes what is scored (tiles cut them)."""
        return references

    def reference_bytes(self) -> int:
        """The memory the known-good references this predictor scores against hold (0:
        it has none), what the service reports for a kept reference set. A wrapper
        answers for the method under it; a reference mode overrides this."""
        method, _ = self.layers()
        return 0 if method is self else method.reference_bytes()

    def describe(self) -> dict[str, Any]:
        """What the service and reports show about the model."""
        return {
            "method": self.method,
            "image_size": self.preprocessor.size,
            "map_range": list(self.postprocessor.map_range),
            "settings": self.settings(),
        }

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        """Score decoded RGB images (one batch, or the whole set for ``scores_sets``)."""
        if not images:
            return []
        preprocessor, postprocessor = self.preprocessor, self.postprocessor
        scores, maps = self.score_decoded(images, preprocessor)
        results = []
        for index, image in enumerate(images):
            score = float(scores[index])
            check_finite(self.method, f"image {index + 1} of the batch", score, maps[index])
            results.append(
                AnomalyPrediction(
                    describe(image),
                    score,
                    maps[index],
                    original_size(image),
                    preprocessor,
                    postprocessor,
                )
            )
        return results

    def score_decoded(
        self, images: Sequence[Image.Image], preprocessor: PreProcessor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of decoded images, preprocessed into one batch: a method that
        scores a set in parts (MuSc's subsets) preprocesses each part when it needs it."""
        return self.score_tensors(torch.stack([preprocessor.tensor(image) for image in images]))

    def predict(
        self,
        sources: Iterable[ImageSource],
        batch_size: int = 8,
        progress: bool = False,
        errors: ErrorPolicy = "raise",
    ) -> list[AnomalyPrediction | SkippedImage]:
        """Score images given as paths, bytes, PIL images or arrays, in input order.

        An unreadable image raises :class:`~anomalyclip.preprocess.ImageLoadError` naming
        it, or with ``errors="skip"`` becomes a :class:`SkippedImage` in its place.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sources = list(sources)
        results: list[AnomalyPrediction | SkippedImage | None] = [None] * len(sources)
        pending: list[tuple[int, Image.Image]] = []
        bar = tqdm(total=len(sources), desc=self.method, unit="img", disable=not progress)

        def flush() -> None:
            predictions = self.predict_images([image for _, image in pending])
            for (index, _), prediction in zip(pending, predictions, strict=True):
                prediction.source = describe(sources[index])
                results[index] = prediction
            bar.update(len(pending))
            pending.clear()

        with bar:
            for index, source in enumerate(sources):
                try:
                    pending.append((index, load_image(source)))
                except ImageLoadError as error:
                    if errors == "raise":
                        raise
                    results[index] = SkippedImage(error.source, error.reason)
                    bar.update(1)
                if len(pending) == batch_size and not self.scores_sets:
                    flush()
            if pending:
                flush()
        return [result for result in results if result is not None]
