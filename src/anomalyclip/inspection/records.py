"""The record of one scored image and of a whole run: what ``predict`` keeps of each.

One record type for every place a scored image is described: the JSON Lines and CSV
rows (:meth:`InspectionResult.to_record`), a resumed run's earlier results
(:meth:`InspectionResult.from_record`), the report's cards and ``summary.json``
(:class:`InspectionSummary`). The field lists live here, beside the type they describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anomalyclip.predictor import AnomalyPrediction, SkippedImage

__all__ = ["CSV_FIELDS", "RECORD_FIELDS", "InspectionResult", "InspectionSummary"]

CSV_FIELDS = (
    "image",
    "score",
    "anomalous",
    "image_threshold",
    "defect_fraction",
    "map_max",
    "width",
    "height",
    "overlay",
    "mask",
    "map",
)
# The fields of every result record: the CSV's and the thumbnail (the input CSV's own
# columns follow them).
RECORD_FIELDS = frozenset((*CSV_FIELDS, "thumbnail", "scored_share"))


@dataclass
class InspectionResult:
    """One image's outcome; file paths are relative to the output folder."""

    image: str
    name: str
    score: float
    anomalous: bool | None
    width: int
    height: int
    map_max: float
    defect_fraction: float | None
    overlay: str | None = None
    mask: str | None = None
    thumbnail: str | None = None
    map: str | None = None
    prediction: AnomalyPrediction | None = None  # with the map, when kept
    # the share of the image's area the method scored, where it left part unscored (a
    # centre crop of a non-square image); None: all of it
    scored_share: float | None = None
    # the input CSV's other cells, or a stream's bank fields
    columns: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(
        cls, record: dict[str, Any], name: str, columns: dict[str, str]
    ) -> InspectionResult:
        """An earlier run's result from its JSON Lines record (a resumed run's)."""

        def text(key: str) -> str | None:
            value = record.get(key)
            return value if isinstance(value, str) else None

        anomalous = record.get("anomalous")
        fraction = record.get("defect_fraction")
        share = record.get("scored_share")
        return cls(
            image=str(record["image"]),
            name=name,
            score=float(record["score"]),
            anomalous=anomalous if isinstance(anomalous, bool) else None,
            width=int(record["width"]),
            height=int(record["height"]),
            map_max=float(record["map_max"]),
            defect_fraction=None if fraction is None else float(fraction),
            overlay=text("overlay"),
            mask=text("mask"),
            thumbnail=text("thumbnail"),
            map=text("map"),
            columns=columns,
            scored_share=float(share) if isinstance(share, (int, float)) else None,
        )

    def to_record(self, image_threshold: float | None = None) -> dict[str, Any]:
        """The result's fields, then the input CSV's other columns (ours win a clash)."""
        record = {
            "image": self.image,
            "score": self.score,
            "anomalous": self.anomalous,
            "image_threshold": image_threshold,
            "defect_fraction": self.defect_fraction,
            "map_max": self.map_max,
            "width": self.width,
            "height": self.height,
            "overlay": self.overlay,
            "mask": self.mask,
            "map": self.map,
            "thumbnail": self.thumbnail,
            "scored_share": self.scored_share,  # None: the whole image was scored
        }
        extra = {k: v for k, v in self.columns.items() if k not in RECORD_FIELDS}
        return {**record, **extra}


@dataclass
class InspectionSummary:
    """Everything a run produced; ``to_dict`` is what ``summary.json`` holds."""

    results: list[InspectionResult] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    image_threshold: float | None = None
    image_threshold_source: str | None = None
    pixel_threshold: float | None = None
    pixel_threshold_source: str | None = None
    map_range: tuple[float, float] = (0.0, 1.0)
    # the overlays' colour scale (low, high) and how it was chosen
    colour_scale: tuple[float, float] | None = None
    colour_scale_source: str | None = None
    colour_map: str = "jet"  # the overlays' (and the report legend's) colour map
    output_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: int = 0  # results taken from the run this one continued
    false_alarm: dict[str, Any] | None = None  # what thresholds set for a rate promise

    @property
    def anomalous(self) -> list[InspectionResult]:
        return [r for r in self.results if r.anomalous]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": len(self.results) + len(self.skipped),
            "scored": len(self.results),
            "anomalous": None if self.image_threshold is None else len(self.anomalous),
            "skipped": [s.to_record() for s in self.skipped],
            "image_threshold": self.image_threshold,
            "image_threshold_source": self.image_threshold_source,
            "pixel_threshold": self.pixel_threshold,
            "pixel_threshold_source": self.pixel_threshold_source,
            "map_range": list(self.map_range),
            "colour_scale": None if self.colour_scale is None else list(self.colour_scale),
            "colour_scale_source": self.colour_scale_source,
            "colour_map": self.colour_map,
            "output_dir": self.output_dir,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "resumed": self.resumed,
            "false_alarm": self.false_alarm,
        }
