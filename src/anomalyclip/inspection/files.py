"""The files an inspection leaves for people: overlays, masks, thumbnails, maps, tables.

Split from :mod:`anomalyclip.inspection.run` so that module keeps one job (the inspection
loop: scoring, verdicts, resuming) and this one keeps the other (what each result
becomes on disk and how the final tables look). Every file goes through
:mod:`anomalyclip.utils.atomic`, so a run killed mid-write leaves no half file behind.
The streamed JSON Lines and the output folder's ownership are in
:mod:`anomalyclip.inspection.run_folder`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip.inspection.records import (
    CSV_FIELDS,
    RECORD_FIELDS,
    InspectionResult,
    InspectionSummary,
)
from anomalyclip.inspection.report import write_report
from anomalyclip.inspection.run_folder import (
    DEFAULT_OVERLAY_SIDE,
    LARGE_PHOTO_PIXELS,
    OverlayFormat,
)
from anomalyclip.predictor import AnomalyPrediction
from anomalyclip.utils.atomic import atomic_open, atomic_write_json
from anomalyclip.utils.csv_cells import csv_cell
from anomalyclip.visualize import defect_mask, fit_within, render_overlay

THUMBNAIL_SIDE = 256


# images ----------------------------------------------------------------------------------


def _save_image(image: Image.Image, path: Path, image_format: str, **options: Any) -> None:
    with atomic_open(path, "wb") as handle:
        image.save(handle, format=image_format, **options)


# Overlays are drawn at most this many pixels on a side whatever the image: a 13,376 x
# 13,376 PNG's overlay at full size took gigabytes of colour arrays (masks stay full size).


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays are drawn and stored (``max_side`` None: full size)."""

    alpha: float = 0.5
    colormap: str = "jet"
    image_format: OverlayFormat = "auto"
    max_side: int | None = DEFAULT_OVERLAY_SIDE

    def format_for(self, size: tuple[int, int]) -> str:
        """ "png" or "jpeg" for an original of (width, height): "auto" picks JPEG for
        large photos, where PNG is ten times bigger and no more useful to a person."""
        if self.image_format != "auto":
            return self.image_format
        return "jpeg" if size[0] * size[1] > LARGE_PHOTO_PIXELS else "png"

    def size_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) scaled down, aspect kept, to at most ``max_side``."""
        return fit_within(size, self.max_side)


def write_images(
    out: Path,
    result: InspectionResult,
    image: Image.Image,
    prediction: AnomalyPrediction,
    style: OverlayStyle,
    full_map: np.ndarray | None = None,
    scale: tuple[float, float] | None = None,
) -> None:
    """The overlay, the mask (with a pixel threshold) and the thumbnail of one result;
    their paths, relative to ``out``, go into ``result``. ``full_map`` is the map at the
    original size when the caller made it (with a pixel threshold, for the mask: it is
    computed once, and without one no full-size map is made unless the overlay is drawn
    at full size: 716 MB at 13,376 x 13,376). ``scale``: the run's colour scale
    (default: the method's map range)."""
    threshold = prediction.postprocessor.pixel_threshold
    if full_map is None and style.size_for(prediction.original_size) == image.size:
        full_map = prediction.map_at_original_size()  # drawn at full size: made after all
    blended = render_overlay(
        image,
        prediction,
        alpha=style.alpha,
        colormap=style.colormap,
        max_side=style.max_side,
        scale=scale,
        full_map=full_map,
    ).image
    if style.format_for(prediction.original_size) == "jpeg":
        result.overlay = f"overlays/{result.name}.jpg"
        _save_image(blended, out / result.overlay, "JPEG", quality=90)
    else:
        result.overlay = f"overlays/{result.name}.png"
        _save_image(blended, out / result.overlay, "PNG", compress_level=1)  # 2x faster
    if threshold is not None and full_map is not None:
        result.mask = f"masks/{result.name}.png"  # full size: the map placed on the image
        _save_image(defect_mask(full_map, threshold), out / result.mask, "PNG")
    blended.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    result.thumbnail = f"thumbnails/{result.name}.jpg"
    _save_image(blended, out / result.thumbnail, "JPEG", quality=85)


def save_map(directory: str | Path, prediction: AnomalyPrediction, name: str | None = None) -> Path:
    """The map at model resolution as ``<name>.npy`` (float32); name defaults to the stem."""
    target = Path(directory) / f"{name or Path(prediction.source).stem}.npy"
    with atomic_open(target, "wb") as handle:
        np.save(handle, prediction.anomaly_map.astype(np.float32))
    return target


# tables ----------------------------------------------------------------------------------


def write_outputs(
    summary: InspectionSummary,
    out: Path | None,
    jsonl: Path | None,
    streamed: list[dict[str, Any]],
    title: str,
) -> None:
    """The tables, report and summary; the JSON Lines are rewritten only when what was
    streamed is not the final list in input order (a resumed run)."""
    records = [r.to_record(summary.image_threshold) for r in summary.results]
    extra_fields = list(
        dict.fromkeys(k for r in summary.results for k in r.columns if k not in RECORD_FIELDS)
    )
    if jsonl is not None:
        if records != streamed:
            write_jsonl(jsonl, records)
        summary.files["jsonl"] = str(jsonl)
    if out is None:
        return
    write_csv(out / "predictions.csv", records, extra_fields)
    summary.files["csv"] = str(out / "predictions.csv")
    write_report(out / "report.html", records, summary.to_dict(), title=title)
    summary.files["report"] = str(out / "report.html")
    summary.files["summary"] = str(out / "summary.json")
    atomic_write_json(out / "summary.json", summary.to_dict())


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line; each has at least "image" and "score"."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, allow_nan=False) + "\n")


def write_csv(
    path: str | Path, records: Iterable[dict[str, Any]], extra_fields: Sequence[str] = ()
) -> None:
    """The records as CSV: :data:`CSV_FIELDS`, then ``extra_fields`` (the input CSV's own
    columns); a missing verdict or cell is empty."""
    fields = [*CSV_FIELDS, *extra_fields]
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_cell(record.get(k)) for k in fields})


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return csv_cell(value)
