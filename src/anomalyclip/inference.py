"""Scoring collections of image files: gathering inputs, batching, writing results."""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomalyclip.model import AnomalyCLIP, AnomalyPrediction
from anomalyclip.preprocess import ImageLoadError
from anomalyclip.utils.atomic import atomic_open

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def gather_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively, glob patterns expanded; sorted per input.

    An input that matches nothing raises FileNotFoundError naming it.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(
                Path(p) for p in glob.glob(str(item), recursive=True) if is_image_file(Path(p))
            )
        if not matches:
            raise FileNotFoundError(f"no images found at {item}")
        found.extend(matches)
    unique = list(dict.fromkeys(found))
    return unique


@dataclass
class SkippedImage:
    path: str
    reason: str


@dataclass
class RunSummary:
    predictions: list[AnomalyPrediction] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)


def predict_files(
    model: AnomalyCLIP, paths: Iterable[Path], batch_size: int = 8, progress: bool = True
) -> Iterator[AnomalyPrediction | SkippedImage]:
    """Predictions in input order; an unreadable file yields a SkippedImage and the run goes on."""
    from tqdm.auto import tqdm

    paths = list(paths)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    pending: list[Path] = []

    def flush() -> Iterator[AnomalyPrediction]:
        yield from model.predict(pending, batch_size=len(pending))
        bar.update(len(pending))
        pending.clear()

    from anomalyclip.preprocess import load_image

    for path in paths:
        try:
            load_image(path).close()
        except ImageLoadError as error:
            logger.warning("skipping %s", error)
            bar.update(1)
            yield SkippedImage(str(path), error.reason)
            continue
        pending.append(path)
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
    bar.close()


def write_jsonl(path: str | Path, predictions: Iterable[AnomalyPrediction]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for prediction in predictions:
            record = {"image": prediction.source, "score": prediction.score}
            if prediction.threshold is not None:
                record["anomalous"] = bool(prediction.is_anomalous)
            handle.write(json.dumps(record) + "\n")


def save_map(directory: str | Path, prediction: AnomalyPrediction) -> Path:
    """The final map at model resolution as ``<stem>.npy`` (float32)."""
    target = Path(directory) / f"{Path(prediction.source).stem}.npy"
    with atomic_open(target, "wb") as handle:
        np.save(handle, prediction.anomaly_map.astype(np.float32))
    return target
