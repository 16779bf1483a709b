"""What a request will cost, from what the same work cost before: refuse up front what
would not finish within the request timeout.

Counting bytes and pixels does not bound the work: 64 PNGs of 32 x 32 pixels (203 KB)
are 64 images at the model's resolution, and a set method's images score each other, so
its work grows with the square of the set. The worker records the seconds each kind of
job took per unit (an image; for a set, a pair of images) and the next request's cost is
estimated from the slowest recent rate; one that would run past the timeout is refused
with 413 before anything is decoded. Until a kind of work has been seen once, only the
count limits apply.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from anomalyclip.serving.uploads import UploadTooLarge

__all__ = ["Work", "WorkCosts"]

# Rates kept per kind of work: the slowest of the recent ones is the estimate, so one
# fast request on a quiet machine does not admit a flood on a busy one.
RECENT = 8


@dataclass(frozen=True)
class Work:
    """What a job is, for its cost: the method, the kind of work and the image count."""

    method: str
    kind: str  # "images" (each scored alone), "set" (scoring each other), "references"
    count: int


class WorkCosts:
    """Seconds per unit of work, by method and kind ("images", "set", "references")."""

    def __init__(self) -> None:
        self._rates: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def units(kind: str, count: int) -> int:
        """A set's images score each other: its work is in pairs."""
        return count * count if kind == "set" else count

    def observe(self, method: str, kind: str, count: int, seconds: float) -> None:
        if count < 1 or seconds <= 0:
            return
        with self._lock:
            rates = self._rates.setdefault((method, kind), deque(maxlen=RECENT))
            rates.append(seconds / self.units(kind, count))

    def estimate(self, method: str, kind: str, count: int) -> float | None:
        """Seconds the work would take, or None before any was seen."""
        with self._lock:
            rates = self._rates.get((method, kind))
            return None if not rates else max(rates) * self.units(kind, count)

    def check(self, method: str, kind: str, count: int, timeout_s: float) -> None:
        """Refuse (413) work estimated to run past ``timeout_s``."""
        seconds = self.estimate(method, kind, count)
        if seconds is None or seconds <= timeout_s:
            return
        fits = count
        while fits > 1 and (self.estimate(method, kind, fits) or 0.0) > timeout_s:
            fits -= 1
        what = "a set" if kind == "set" else "a request"
        raise UploadTooLarge(
            f"{count} images would take about {seconds:.0f} s with {method} (measured on "
            f"earlier requests), over the {timeout_s:g} s timeout; send at most {fits} in "
            f"{what}"
        )
