"""What turns a score and a map into decisions: thresholds and the range maps lie in.

One :class:`PostProcessor` travels with every model (and inside every ONNX export). It
resolves each threshold as *given > calibrated > none*: an explicit value wins, else the
one calibration stored in the checkpoint, else there is no threshold and hence no verdict
(image) or no mask (pixel). Inventing a threshold from the map's range would give a
defect area of 100 % on one dataset and 0 % on the next, so none is invented.

A NaN compares as False against any threshold, so a damaged model would answer "normal"
for every image: a non-finite score, map or threshold is an error here, never a verdict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ThresholdSource = Literal["given", "calibrated"]


class NonFiniteScoreError(ValueError):
    """A score or map holds NaN or infinity: the model or its inputs are damaged.

    Raised wherever such a value is found instead of answering a verdict; importable from
    :mod:`anomalyclip.predictor` too, where the scoring loop raises it.
    """


@dataclass(frozen=True)
class PostProcessor:
    """Thresholds and the map range of one model; immutable, so it can be shared.

    ``map_range`` is the (low, high) interval every map of the model lies in (AnomalyCLIP:
    0 to the number of feature layers): overlays colour that range, so the same colour
    means the same value on every image.
    """

    map_range: tuple[float, float] = (0.0, 1.0)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    image_threshold_source: ThresholdSource | None = None
    pixel_threshold_source: ThresholdSource | None = None
    # what calibrated thresholds set for a false-alarm rate promise (target, n, bound and
    # the thresholds it applies_to); a given threshold takes its kind out
    false_alarm: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.map_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"map_range must be finite (low, high) with low < high, got {self.map_range}"
            )
        object.__setattr__(self, "map_range", (low, high))
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and math.isnan(value):
                raise ValueError(f"{name} is NaN: no score can be compared with it")

    @classmethod
    def calibrated(
        cls,
        map_range: tuple[float, float],
        image_threshold: float | None,
        pixel_threshold: float | None,
        false_alarm: dict[str, Any] | None = None,
    ) -> PostProcessor:
        """The post-processor a checkpoint's stored calibration implies."""
        return cls(
            map_range,
            None if image_threshold is None else float(image_threshold),
            None if pixel_threshold is None else float(pixel_threshold),
            None if image_threshold is None else "calibrated",
            None if pixel_threshold is None else "calibrated",
            dict(false_alarm) if false_alarm else None,
        )

    def with_given(
        self, image_threshold: float | None = None, pixel_threshold: float | None = None
    ) -> PostProcessor:
        """Given values take precedence over calibrated ones; None keeps what is there."""
        changes: dict[str, Any] = {}
        if image_threshold is not None:
            changes.update(image_threshold=float(image_threshold), image_threshold_source="given")
        if pixel_threshold is not None:
            changes.update(pixel_threshold=float(pixel_threshold), pixel_threshold_source="given")
        if self.false_alarm is not None:
            given = {"image": image_threshold, "pixel": pixel_threshold}
            kept = [k for k in self.false_alarm.get("applies_to", ()) if given.get(k) is None]
            changes["false_alarm"] = {**self.false_alarm, "applies_to": kept} if kept else None
        return dataclasses.replace(self, **changes)

    def verdict(self, score: float) -> bool | None:
        """Anomalous when ``score >= image_threshold``; None without a threshold.

        A non-finite score raises :class:`NonFiniteScoreError`, threshold or not.
        """
        if not math.isfinite(score):
            raise NonFiniteScoreError(f"the anomaly score is {score}: no verdict can be given")
        return None if self.image_threshold is None else bool(score >= self.image_threshold)

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray | None:
        """Boolean defect mask ``map >= pixel_threshold``; None without a threshold.

        A map holding NaN or infinity raises :class:`NonFiniteScoreError`.
        """
        if self.pixel_threshold is None:
            return None
        values = np.asarray(anomaly_map)
        if not np.isfinite(values).all():
            raise NonFiniteScoreError("the anomaly map holds NaN or infinite values: no mask")
        return values >= self.pixel_threshold

    def defect_fraction(self, anomaly_map: np.ndarray) -> float | None:
        mask = self.mask(anomaly_map)
        return None if mask is None else float(mask.mean())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["map_range"] = list(self.map_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostProcessor:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "map_range" in values:
            values["map_range"] = tuple(values["map_range"])
        return cls(**values)


def describe_false_alarm(promise: dict[str, Any]) -> str:
    """One line a person reads: what a threshold set for a false-alarm rate promises
    (the target, from how many good images, and the upper bound on the rate achieved)."""
    return (
        f"false-alarm rate target {promise['target']:g} from {promise['n_good']} good images "
        f"(expected {promise['expected']:.3g}; at {promise['confidence']:.0%} confidence at "
        f"most {promise['upper_bound']:.3g})"
    )
