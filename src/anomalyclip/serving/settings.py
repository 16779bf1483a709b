"""The limits and thresholds of one service instance, shared by every serving module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and thresholds of one service instance.

    ``image_threshold`` / ``pixel_threshold`` are *given* thresholds: they take precedence
    over the model's calibrated ones (:meth:`PostProcessor.with_given
    <anomalyclip.postprocess.PostProcessor.with_given>`), and a request's own query
    thresholds over both. Left as None with nothing calibrated, there is no threshold: no
    verdict and no mask, rather than one guessed from the map's range.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_size: int = 16
    max_set_size: int = 64
    max_set_pixels: int = 200_000_000
    request_timeout_s: float = 60.0
    max_pending: int = 32
    max_pending_bytes: int = 256 * 1024 * 1024
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    max_reference_sets: int = 4  # kept in memory, the least recently used dropped first
    map_max_side: int = 256
    overlay_max_side: int = 1024

    def __post_init__(self) -> None:
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "max_batch_size",
            "max_set_size",
            "max_set_pixels",
            "max_reference_sets",
            "max_pending",
            "max_pending_bytes",
            "map_max_side",
            "overlay_max_side",
        )
        problems = [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        if not self.request_timeout_s > 0:
            problems.append("request_timeout_s must be positive")
        if problems:
            raise ValueError("invalid service settings: " + "; ".join(problems))
