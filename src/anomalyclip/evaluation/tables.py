"""The evaluation's tables beyond the paper's: what a user checks before trusting a model.

The per-class table (:mod:`anomalyclip.evaluation.evaluate`) answers "how good is the ranking";
a user deciding whether to deploy also asks which images scored what, which defect types
are missed, how the model does with one threshold for every class, and what the
calibrated threshold does on labelled images. This module holds those tables and the
shared formatting:

- per-image scores (``scores.csv``): image, class, defect type, label, score, map max;
- rows per defect type: image metrics of that type's images against the class's normal
  images (a type the model misses is hidden in the class's mean otherwise); pixel
  metrics over that type's images;
- a pooled row: every image of every class together, as one threshold for all classes
  would see them. Pixel metrics are pooled only while the maps fit
  :data:`POOLED_PIXEL_LIMIT` (every map of the dataset is held at once), else undefined;
- at the model's image threshold (given or calibrated): false alarms (normal images
  flagged), escapes (anomalous images missed), their rates, precision, recall and F1;
- images that could not be read (or whose mask could not), skipped and listed.

Undefined values are NaN here, "-" in Markdown, empty in CSV and null in JSON.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalyclip.evaluation import metrics
from anomalyclip.evaluation.metrics import AuproMethod
from anomalyclip.utils.atomic import atomic_write_json, atomic_write_text
from anomalyclip.utils.csv_cells import csv_cell

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
POOLED_ROW = "pooled"
# pooled pixel metrics hold every map and mask of the dataset at once (and sort them):
# 2**27 pixels is about 470 maps at 518 x 518, under 2 GB at the peak
POOLED_PIXEL_LIMIT = 2**27


# formatting ---------------------------------------------------------------------------


def nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def json_number(value: float) -> float | None:
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


def records_to_csv(records: Sequence[dict[str, Any]], fieldnames: Sequence[str] = ()) -> str:
    """CSV of ``records`` (None empty); ``fieldnames`` give the header when there are none."""
    buffer = io.StringIO()
    names = list(records[0]) if records else list(fieldnames)
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else csv_cell(v) for k, v in record.items()})
    return buffer.getvalue()


# metrics ------------------------------------------------------------------------------


def class_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    aupro_method: AuproMethod = "original",
) -> dict[str, float]:
    """Every metric of one group of images; pixel ones NaN when ``masks`` is None."""
    functions: dict[str, Callable[[], float]] = {}
    if labels.size:
        functions.update(
            image_auroc=lambda: metrics.image_auroc(labels, scores),
            image_ap=lambda: metrics.image_ap(labels, scores),
            image_f1_max=lambda: metrics.image_f1_max(labels, scores),
        )
    if masks is not None and maps is not None and masks.size:
        functions.update(
            pixel_auroc=lambda: metrics.pixel_auroc(masks, maps),
            pixel_aupro=lambda: metrics.aupro(masks, maps, method=aupro_method),
            pixel_ap=lambda: metrics.pixel_ap(masks, maps),
            pixel_f1_max=lambda: metrics.pixel_f1_max(masks, maps),
        )
    return {name: float(functions[name]()) if name in functions else math.nan for name in METRICS}


@dataclass
class ImageScore:
    """One evaluated image: the row of ``scores.csv``."""

    image: str
    category: str
    defect: str
    label: int
    score: float
    map_max: float

    def to_record(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "class": self.category,
            "defect": self.defect,
            "label": self.label,
            "score": self.score,
            "map_max": self.map_max,
        }


@dataclass
class SkippedSample:
    """An image of the dataset left out of every metric, and why (it or its mask)."""

    image: str
    category: str
    reason: str

    def to_record(self) -> dict[str, str]:
        return {"image": self.image, "class": self.category, "reason": self.reason}


@dataclass
class GroupResult:
    """A row of the breakdown: one defect type of one class, or the pooled images."""

    category: str
    defect: str
    normal: int
    anomalous: int
    metrics: dict[str, float]

    @property
    def name(self) -> str:
        return self.category if self.category == POOLED_ROW else f"{self.category} / {self.defect}"

    def to_record(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "defect": self.defect,
            "normal": self.normal,
            "anomalous": self.anomalous,
            **{name: json_number(self.metrics.get(name, math.nan)) for name in METRICS},
        }


def defect_results(
    category: str,
    defects: Sequence[str],
    labels: np.ndarray,
    scores: np.ndarray,
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    aupro_method: AuproMethod,
) -> list[GroupResult]:
    """A row per defect type of one class, in order of appearance.

    Image metrics: that type's images against all the class's normal images. Pixel
    metrics: over that type's images whose pixels are known; ``pixels`` is (indices of
    those images in the class, their masks, their maps), None without pixel truth.
    """
    names = list(dict.fromkeys(d for d, label in zip(defects, labels, strict=True) if label))
    normal = labels == 0
    rows = []
    for name in names:
        mine = np.array([d == name for d in defects]) & (labels == 1)
        chosen = normal | mine
        masks = maps = None
        if pixels is not None:
            known, known_masks, known_maps = pixels
            inside = mine[known]
            masks, maps = known_masks[inside], known_maps[inside]
        values = class_metrics(labels[chosen], scores[chosen], masks, maps, aupro_method)
        rows.append(GroupResult(category, name, int(normal.sum()), int(mine.sum()), values))
    return rows


class Pool:
    """Every class's images together, for the pooled row; maps only while they fit."""

    def __init__(self, pixel_limit: int = POOLED_PIXEL_LIMIT) -> None:
        self.pixel_limit = pixel_limit
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []
        self.pixels = 0
        self.pixel_level = True  # until a class has no pixel truth or the maps overflow

    def add(
        self, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: Any
    ) -> None:
        self.labels.append(labels)
        self.scores.append(scores)
        if not self.pixel_level:
            return
        if masks is None or maps is None:
            self.drop_maps()
            return
        self.pixels += int(masks.size)
        if self.pixels > self.pixel_limit:
            logger.info(
                "pooled pixel metrics left undefined: the maps exceed %d pixels", self.pixel_limit
            )
            self.drop_maps()
            return
        self.masks.append(masks)
        self.maps.append(np.asarray(maps))

    def drop_maps(self) -> None:
        self.pixel_level = False
        self.masks, self.maps = [], []

    def result(self, aupro_method: AuproMethod) -> GroupResult:
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        masks = maps = None
        if self.pixel_level and self.masks:
            masks, maps = np.concatenate(self.masks), np.concatenate(self.maps)
        values = class_metrics(labels, scores, masks, maps, aupro_method)
        normal = int((labels == 0).sum())
        return GroupResult(POOLED_ROW, "all", normal, len(labels) - normal, values)


@dataclass
class ThresholdResult:
    """Image verdicts at one threshold (``score >= threshold`` is flagged) for a group."""

    category: str
    threshold: float
    normal: int
    anomalous: int
    false_alarms: int  # normal images flagged
    escapes: int  # anomalous images not flagged

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.normal if self.normal else math.nan

    @property
    def escape_rate(self) -> float:
        return self.escapes / self.anomalous if self.anomalous else math.nan

    @property
    def precision(self) -> float:
        caught = self.anomalous - self.escapes
        flagged = caught + self.false_alarms
        return caught / flagged if flagged else math.nan

    @property
    def recall(self) -> float:
        return 1.0 - self.escape_rate

    @property
    def f1(self) -> float:
        caught = self.anomalous - self.escapes
        total = 2 * caught + self.false_alarms + self.escapes
        return 2 * caught / total if total else math.nan

    @classmethod
    def of(cls, category: str, threshold: float, images: Sequence[ImageScore]) -> ThresholdResult:
        normal = [i for i in images if i.label == 0]
        anomalous = [i for i in images if i.label == 1]
        false_alarms = sum(i.score >= threshold for i in normal)
        escapes = sum(i.score < threshold for i in anomalous)
        return cls(category, threshold, len(normal), len(anomalous), false_alarms, escapes)

    def to_record(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "threshold": self.threshold,
            "normal": self.normal,
            "anomalous": self.anomalous,
            "false_alarms": self.false_alarms,
            "false_alarm_rate": json_number(self.false_alarm_rate),
            "escapes": self.escapes,
            "escape_rate": json_number(self.escape_rate),
            "precision": json_number(self.precision),
            "recall": json_number(self.recall),
            "f1": json_number(self.f1),
        }


# the details of one dataset ------------------------------------------------------------


@dataclass
class Details:
    """Everything of one dataset's evaluation besides the per-class table."""

    images: list[ImageScore] = field(default_factory=list)
    skipped: list[SkippedSample] = field(default_factory=list)
    defects: list[GroupResult] = field(default_factory=list)
    pooled: GroupResult | None = None
    threshold: float | None = None
    threshold_source: str | None = None

    def at_threshold(self) -> list[ThresholdResult]:
        """A row per class and a pooled row; none without an image threshold."""
        if self.threshold is None:
            return []
        classes = list(dict.fromkeys(image.category for image in self.images))
        rows = [
            ThresholdResult.of(c, self.threshold, [i for i in self.images if i.category == c])
            for c in classes
        ]
        return [*rows, ThresholdResult.of(POOLED_ROW, self.threshold, self.images)]

    def breakdown(self) -> list[GroupResult]:
        return [*self.defects, *([self.pooled] if self.pooled is not None else [])]

    def skipped_note(self, shown: int = 20) -> str:
        """Markdown lines under the table naming what was skipped; empty if nothing."""
        if not self.skipped:
            return ""
        lines = [f"{len(self.skipped)} images skipped (not in any metric):", ""]
        lines += [f"- {s.image}: {s.reason}" for s in self.skipped[:shown]]
        if len(self.skipped) > shown:
            lines.append(f"- and {len(self.skipped) - shown} more (results.json)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluated": len(self.images),
            "skipped_count": len(self.skipped),
            "skipped": [s.to_record() for s in self.skipped],
            "pooled": self.pooled.to_record() if self.pooled is not None else None,
            "defects": [row.to_record() for row in self.defects],
            "image_threshold": self.threshold,
            "image_threshold_source": self.threshold_source,
            "at_threshold": [row.to_record() for row in self.at_threshold()],
        }

    def threshold_markdown(self, title: str) -> str:
        rows = self.at_threshold()
        if not rows:
            return ""
        header = ["class", "normal", "false alarms", "rate", "anomalous", "escapes", "rate"]
        header += ["precision", "recall", "F1"]
        lines = [
            f"**{title} at image threshold {self.threshold:.6g} ({self.threshold_source})**",
            "",
            "| " + " | ".join(header) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        ]
        for row in rows:
            cells = [row.category, str(row.normal), str(row.false_alarms)]
            cells += [format_metric(row.false_alarm_rate), str(row.anomalous), str(row.escapes)]
            cells += [format_metric(v) for v in (row.escape_rate, row.precision, row.recall)]
            cells.append(format_metric(row.f1))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, directory: Path, title: str) -> dict[str, Path]:
        """``scores.csv``, ``breakdown.{md,csv}`` and, with a threshold, ``threshold.{md,csv}``."""
        paths = {
            "scores": directory / "scores.csv",
            "breakdown_markdown": directory / "breakdown.md",
            "breakdown_csv": directory / "breakdown.csv",
        }
        score_fields = ["image", "class", "defect", "label", "score", "map_max"]
        records = [image.to_record() for image in self.images]
        atomic_write_text(paths["scores"], records_to_csv(records, score_fields))
        rows = self.breakdown()
        table = markdown_table(
            [(row.name, row.normal, row.anomalous, row.metrics) for row in rows],
            first_column="class / defect",
            title=f"{title} by defect type, and pooled over classes",
        )
        atomic_write_text(paths["breakdown_markdown"], table + "\n")
        breakdown_fields = ["category", "defect", "normal", "anomalous", *METRICS]
        breakdown = records_to_csv([row.to_record() for row in rows], breakdown_fields)
        atomic_write_text(paths["breakdown_csv"], breakdown)
        if self.threshold is not None:
            paths["threshold_markdown"] = directory / "threshold.md"
            paths["threshold_csv"] = directory / "threshold.csv"
            atomic_write_text(paths["threshold_markdown"], self.threshold_markdown(title) + "\n")
            threshold_rows = [row.to_record() for row in self.at_threshold()]
            atomic_write_text(paths["threshold_csv"], records_to_csv(threshold_rows))
        return paths


# the tables of a dataset and of a run -------------------------------------------------


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
            **{name: json_number(self.metrics.get(name, math.nan)) for name in METRICS},
        }


@dataclass
class EvaluationResult:
    """The per-class table of one dataset and its mean row; ``details`` holds the rest
    (per-image scores, defect types, pooled row, verdicts at the threshold, skipped)."""

    dataset: str
    classes: list[ClassResult]
    settings: dict[str, Any] = field(default_factory=dict)
    details: Details = field(default_factory=Details)

    @property
    def mean(self) -> dict[str, float]:
        return {name: nan_mean([c.metrics[name] for c in self.classes]) for name in METRICS}

    def rows(self) -> list[ClassResult]:
        """The class rows followed by the mean row."""
        normal = sum(c.normal for c in self.classes)
        anomalous = sum(c.anomalous for c in self.classes)
        return [*self.classes, ClassResult(MEAN_ROW, normal, anomalous, self.mean)]

    def to_markdown(self) -> str:
        """The table, and under it the images skipped, if any."""
        table = markdown_table(
            [(row.category, row.normal, row.anomalous, row.metrics) for row in self.rows()],
            first_column="class",
            title=self.dataset,
        )
        note = self.details.skipped_note()
        return f"{table}\n\n{note}" if note else table

    def to_csv(self) -> str:
        return records_to_csv([row.to_record() for row in self.rows()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "settings": self.settings,
            "classes": [c.to_record() for c in self.classes],
            "mean": {name: json_number(value) for name, value in self.mean.items()},
            **self.details.to_dict(),
        }

    def write(self, directory: str | Path) -> dict[str, Path]:
        """``results.md``, ``results.csv`` and ``results.json`` in ``directory``, and the
        details' files (``scores.csv``, ``breakdown.*``, ``threshold.*``)."""
        directory = Path(directory)
        paths = {
            "markdown": directory / "results.md",
            "csv": directory / "results.csv",
            "json": directory / "results.json",
        }
        atomic_write_text(paths["markdown"], self.to_markdown() + "\n")
        atomic_write_text(paths["csv"], self.to_csv())
        atomic_write_json(paths["json"], self.to_dict())
        paths.update(self.details.write(directory, self.dataset))
        return paths


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
