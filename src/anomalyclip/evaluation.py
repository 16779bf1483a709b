"""Benchmark evaluation: per-class image and pixel metrics, as the paper's tables report them.

Every image is encoded once (through a :class:`~anomalyclip.feature_cache.FeatureCache`,
which can also keep the embeddings on disk for later evaluations of other prompts). Maps
are evaluated at model resolution (S x S), against masks resized as the original does
(binary, bilinear, > 0.5). Pixel metrics use only images whose pixels are known (normal
images and anomalous ones with a mask) and only in datasets that have masks; a metric
that is undefined or not applicable is NaN, written "-" in Markdown, empty in CSV and
null in JSON, never a number. The mean row averages each metric over the classes where
it is defined, as the paper averages over classes.

Under ``torchrun`` the work is shared: each class is cut into batches as in a single
process, and batch ``k`` (counted over the whole dataset) is scored by rank ``k mod
world``. Scores and maps go to rank 0 one round of batches at a time, rank 0 computes the
metrics in the original order, and every rank returns the same result. As every batch
holds the same images as in a single process, the numbers are identical to the last bit.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyclip import distributed, metrics
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.feature_cache import FeatureCache
from anomalyclip.metrics import AuproMethod
from anomalyclip.model import AnomalyCLIP
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import PreProcessor, load_image
from anomalyclip.training import object_name
from anomalyclip.utils.atomic import atomic_open, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")
METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_TITLES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_aupro": "P-AUPRO",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
}
MEAN_ROW = "mean"


@dataclass
class ClassResult:
    """One class (category) of one dataset; metrics in [0, 1], NaN where undefined."""

    category: str
    normal: int
    anomalous: int
    metrics: dict[str, float]

    def to_record(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "normal": self.normal,
            "anomalous": self.anomalous,
            **{name: _json_number(self.metrics.get(name, math.nan)) for name in METRICS},
        }


@dataclass
class EvaluationResult:
    """The per-class table of one dataset and its mean row."""

    dataset: str
    classes: list[ClassResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        return {name: nan_mean([c.metrics[name] for c in self.classes]) for name in METRICS}

    def rows(self) -> list[ClassResult]:
        """The class rows followed by the mean row."""
        normal = sum(c.normal for c in self.classes)
        anomalous = sum(c.anomalous for c in self.classes)
        return [*self.classes, ClassResult(MEAN_ROW, normal, anomalous, self.mean)]

    def to_markdown(self) -> str:
        return markdown_table(
            [(row.category, row.normal, row.anomalous, row.metrics) for row in self.rows()],
            first_column="class",
            title=self.dataset,
        )

    def to_csv(self) -> str:
        return records_to_csv([row.to_record() for row in self.rows()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "settings": self.settings,
            "classes": [c.to_record() for c in self.classes],
            "mean": {name: _json_number(value) for name, value in self.mean.items()},
        }

    def write(self, directory: str | Path) -> dict[str, Path]:
        """``results.md``, ``results.csv`` and ``results.json`` in ``directory``."""
        directory = Path(directory)
        paths = {
            "markdown": directory / "results.md",
            "csv": directory / "results.csv",
            "json": directory / "results.json",
        }
        atomic_write_text(paths["markdown"], self.to_markdown() + "\n")
        atomic_write_text(paths["csv"], self.to_csv())
        atomic_write_json(paths["json"], self.to_dict())
        return paths


def nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def format_metric(value: float | None) -> str:
    """Percent with one decimal, as the paper prints; "-" where undefined."""
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}"


def markdown_table(
    rows: Sequence[tuple[str, int, int, dict[str, float]]], first_column: str, title: str = ""
) -> str:
    header = [first_column, "normal", "anomalous", *(METRIC_TITLES[m] for m in METRICS)]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for name, normal, anomalous, values in rows:
        cells = [name, str(normal), str(anomalous)]
        cells += [format_metric(values.get(m, math.nan)) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_to_csv(records: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


def summary_table(results: Sequence[EvaluationResult]) -> str:
    """One row per dataset (its class mean): the layout of the paper's Tables 1 and 2."""
    rows = []
    for result in results:
        mean = result.rows()[-1]
        rows.append((result.dataset, mean.normal, mean.anomalous, mean.metrics))
    return markdown_table(rows, first_column="dataset", title="mean over classes")


def write_summary(results: Sequence[EvaluationResult], directory: str | Path) -> dict[str, Path]:
    """``summary.md``, ``summary.csv``, ``summary.json``: every dataset's mean row."""
    directory = Path(directory)
    records = []
    for result in results:
        mean = result.rows()[-1].to_record()
        del mean["category"]
        records.append({"dataset": result.dataset, **mean})
    paths = {
        "markdown": directory / "summary.md",
        "csv": directory / "summary.csv",
        "json": directory / "summary.json",
    }
    atomic_write_text(paths["markdown"], summary_table(results) + "\n")
    atomic_write_text(paths["csv"], records_to_csv(records))
    atomic_write_json(paths["json"], records)
    return paths


# computing ----------------------------------------------------------------------------


def class_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    aupro_method: AuproMethod = "original",
) -> dict[str, float]:
    """Every metric of one class; pixel ones NaN when ``masks`` is None."""
    functions: dict[str, Callable[[], float]] = {
        "image_auroc": lambda: metrics.image_auroc(labels, scores),
        "image_ap": lambda: metrics.image_ap(labels, scores),
        "image_f1_max": lambda: metrics.image_f1_max(labels, scores),
    }
    if masks is not None and maps is not None and masks.size:
        functions.update(
            pixel_auroc=lambda: metrics.pixel_auroc(masks, maps),
            pixel_aupro=lambda: metrics.aupro(masks, maps, method=aupro_method),
            pixel_ap=lambda: metrics.pixel_ap(masks, maps),
            pixel_f1_max=lambda: metrics.pixel_f1_max(masks, maps),
        )
    return {name: float(functions[name]()) if name in functions else math.nan for name in METRICS}


def load_masks(samples: Sequence[Sample], preprocessor: PreProcessor) -> np.ndarray:
    """(N, S, S) bool masks at model resolution, placed as the model's preprocessing
    places the images; normal images are all False."""
    size = preprocessor.size
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for index, sample in enumerate(samples):
        if sample.label and sample.mask is not None:
            masks[index] = preprocessor.load_mask(sample.mask).numpy() > 0.5
    return masks


def map_path(directory: Path, sample: Sample, suffix: str) -> Path:
    """``<category>/<defect>/<stem><suffix>`` under ``directory``."""
    return directory / (sample.category or "all") / sample.defect / f"{sample.image.stem}{suffix}"


def save_outputs(
    sample: Sample, score: float, anomaly_map: np.ndarray, model: Predictor, maps_dir: Path
) -> None:
    """The map at model resolution (``maps/…npy``) and an overlay on the original image."""
    from anomalyclip.visualize import overlay

    with atomic_open(map_path(maps_dir / "maps", sample, ".npy"), "wb") as handle:
        np.save(handle, anomaly_map.astype(np.float32))
    image = load_image(sample.image)
    prediction = AnomalyPrediction(
        str(sample.image), score, anomaly_map, image.size, model.preprocessor, model.postprocessor
    )
    picture = overlay(image, prediction)
    with atomic_open(map_path(maps_dir / "overlays", sample, ".png"), "wb") as handle:
        picture.save(handle, format="PNG")


@dataclass
class _ClassPlan:
    """One class's images cut into batches, and which rank scores each batch."""

    category: str
    samples: list[Sample]
    batches: list[range]
    owners: list[int]

    def batches_of(self, rank: int) -> list[range]:
        return [b for b, owner in zip(self.batches, self.owners, strict=True) if owner == rank]

    @property
    def rounds(self) -> int:
        """Gathers per class: the most batches any rank has."""
        return max((self.owners.count(r) for r in set(self.owners)), default=0)


def _plan_batches(dataset: AnomalyDataset, batch_size: int, world: int = 1) -> list[_ClassPlan]:
    """Each class's batches as one process makes them; batch ``k`` (counted over the
    dataset) belongs to rank ``k mod world``."""
    plans = []
    counter = 0
    for category, samples in dataset.by_category().items():
        if not samples:
            continue
        batches = [
            range(start, min(start + batch_size, len(samples)))
            for start in range(0, len(samples), batch_size)
        ]
        owners = [distributed.owner(counter + k, world) for k in range(len(batches))]
        counter += len(batches)
        plans.append(_ClassPlan(category, samples, batches, owners))
    return plans


def _score_batches(
    model: AnomalyCLIP,
    plan: _ClassPlan,
    batches: Sequence[range],
    cache: FeatureCache,
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> Iterator[tuple[range, np.ndarray, np.ndarray | None]]:
    """Per batch: its positions in the class, image scores and, if kept, maps (B, S, S)."""
    if not batches:
        return
    with torch.no_grad():
        text = model.text_features(object_name(plan.samples[0], model.config))
    for positions in batches:
        chunk = [plan.samples[i] for i in positions]
        with torch.no_grad():
            output = model.score(cache.embeddings([s.image for s in chunk], len(chunk)), text)
        scores = output.image_scores.double().cpu().numpy()
        chunk_maps = output.anomaly_maps.float().cpu().numpy()
        if maps_dir is not None:
            for sample, anomaly_map, score in zip(chunk, chunk_maps, scores, strict=True):
                save_outputs(sample, float(score), anomaly_map, model, maps_dir)
        bar.update(len(chunk))
        yield positions, scores, chunk_maps if keep_maps else None


def _score_class(
    model: AnomalyCLIP,
    plan: _ClassPlan,
    cache: FeatureCache,
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Image scores (N,) and, if kept, maps (N, S, S) of one class: on rank 0 only.

    Other ranks score their batches and send them to rank 0 a round at a time, so rank 0
    never holds more than one batch per rank besides the class's arrays.
    """
    size = model.config.image_size
    count = len(plan.samples)
    main = distributed.is_main_process()
    scores = np.empty(count, dtype=np.float64) if main else None
    maps = np.empty((count, size, size), dtype=np.float32) if main and keep_maps else None
    mine = _score_batches(
        model, plan, plan.batches_of(distributed.rank()), cache, keep_maps, maps_dir, bar
    )
    for _ in range(plan.rounds):
        gathered = distributed.gather_to_main(next(mine, None))
        for part in gathered or ():
            if part is None:
                continue
            positions, part_scores, part_maps = part
            assert scores is not None  # parts are gathered on rank 0, which has the arrays
            scores[positions.start : positions.stop] = part_scores
            if maps is not None:
                maps[positions.start : positions.stop] = part_maps
    if not main:
        return None
    assert scores is not None  # made above on rank 0
    return scores, maps


def _score_class_as_set(
    model: Predictor,
    plan: _ClassPlan,
    batch_size: int,
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A method other than AnomalyCLIP, through the Predictor seam: image scores and maps.

    A method that scores sets (MuSc) gets the whole class in one call, as its paper
    evaluates; others get batches. Every rank computes the same thing (a set method may
    share its work between the ranks itself); rank 0 returns it.
    """
    samples = plan.samples
    step = len(samples) if model.scores_sets else batch_size
    scores = np.empty(len(samples), dtype=np.float64)
    size = model.preprocessor.size
    maps = np.empty((len(samples), size, size), dtype=np.float32) if keep_maps else None
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        images = model.preprocessor([sample.image for sample in chunk])
        chunk_scores, chunk_maps = model.score_tensors(images)
        scores[start : start + len(chunk)] = chunk_scores
        if maps is not None:
            maps[start : start + len(chunk)] = chunk_maps
        if maps_dir is not None and distributed.is_main_process():
            for sample, anomaly_map, score in zip(chunk, chunk_maps, chunk_scores, strict=True):
                save_outputs(sample, float(score), anomaly_map, model, maps_dir)
        bar.update(len(chunk))
    return (scores, maps) if distributed.is_main_process() else None


def evaluate(
    model: Predictor,
    dataset: AnomalyDataset,
    *,
    batch_size: int = 8,
    cache: FeatureCache | None = None,
    aupro_method: AuproMethod = "original",
    maps_dir: str | Path | None = None,
    name: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score every image of ``dataset`` and compute the metrics of every class.

    ``model``: AnomalyCLIP (encoded once through ``cache``, batches shared between the
    ranks under torchrun) or any other :class:`Predictor`; one that scores sets (MuSc)
    scores each class as one set. With object-aware prompts each class is scored with
    its own name. ``maps_dir``
    receives ``maps/<class>/<defect>/<stem>.npy`` and ``overlays/…png``. ``name`` titles
    the table (default: the dataset's reader name).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    anomalyclip = isinstance(model, AnomalyCLIP)
    if isinstance(model, AnomalyCLIP) and cache is None:
        cache = FeatureCache(model, memory=False)
    size = model.preprocessor.size
    title = name or dataset.name
    pixel_level = dataset.has_masks
    if not pixel_level:
        logger.info("%s has no masks: pixel-level metrics are not applicable", title)
    maps_dir = Path(maps_dir) if maps_dir is not None else None
    plans = _plan_batches(dataset, batch_size, distributed.world_size() if anomalyclip else 1)
    rank = distributed.rank() if anomalyclip else 0
    mine = sum(len(b) for plan in plans for b in plan.batches_of(rank))
    bar = tqdm(
        total=mine,
        desc=f"test {title}",
        unit="img",
        disable=not (progress and distributed.is_main_process()),
    )
    classes = []
    if isinstance(model, AnomalyCLIP):
        model.eval()
    for plan in plans:
        if isinstance(model, AnomalyCLIP):
            assert cache is not None  # made above for AnomalyCLIP
            scored = _score_class(model, plan, cache, pixel_level, maps_dir, bar)
        else:
            scored = _score_class_as_set(model, plan, batch_size, pixel_level, maps_dir, bar)
        if scored is None:
            continue  # another rank than 0: rank 0 computes the metrics
        scores, maps = scored
        samples = plan.samples
        labels = np.array([s.label for s in samples], dtype=np.int64)
        masks = None
        if maps is not None:
            known = [i for i, s in enumerate(samples) if dataset.has_pixel_truth(s)]
            masks = load_masks([samples[i] for i in known], model.preprocessor)
            maps = maps[known]
        values = class_metrics(labels, scores, masks, maps, aupro_method)
        normal = int((labels == 0).sum())
        classes.append(ClassResult(plan.category or title, normal, len(labels) - normal, values))
    bar.close()
    classes = distributed.broadcast_from_main(classes)
    settings = {
        "root": str(dataset.root),
        "split": dataset.split,
        "method": model.method,
        "config": model.config.to_dict() if isinstance(model, AnomalyCLIP) else model.settings(),
        "aupro": aupro_method,
        "map_resolution": size,
    }
    return EvaluationResult(title, classes, settings)
