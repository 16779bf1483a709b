"""Named streams of uploaded images, and the operators who correct them.

What the service's ``/v1/streams/{name}`` routes use, free of HTTP: each :class:`Stream`
is a :class:`~anomalyclip.inspection.stream.StreamScorer` (the same rolling-bank logic
``watch`` uses) over images that arrive as bytes, the images it scored (by SHA-256, so an
operator can name one), and the audit log its changes go to.

An operator marks a scored image **normal** (it joins the bank: a new version, the
previous kept) or **defect** (recorded; it leaves the bank if it was in it and never
enters it again), or goes back to an earlier bank version (**undo**). Each change is
one line of the :class:`~anomalyclip.inspection.bank.AuditLog`, written under the
stream's lock, so concurrent marks are applied one after another and none is lost.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip.calibration import conformal_threshold, needed_for
from anomalyclip.inspection.bank import AuditLog, BankMember, image_sha256
from anomalyclip.inspection.stream import StreamItem, StreamResult, StreamScorer
from anomalyclip.predictor import Predictor

logger = logging.getLogger(__name__)

__all__ = ["MARKS", "Stream", "StreamUnknownImage"]

MARKS = ("normal", "defect")
KEPT_IMAGES = 512  # scored images a stream remembers for marking, the oldest forgotten


class StreamUnknownImage(KeyError):
    """A mark names an image this stream has not scored (or has forgotten)."""


@dataclass(frozen=True)
class Upload:
    """An image as it arrived: its name, bytes and decoded pixels."""

    name: str
    data: bytes
    image: Image.Image


class Stream:
    """One named stream: its scorer and bank, the images it scored, its audit log."""

    def __init__(
        self,
        name: str,
        method: Predictor,
        window: int,
        image_threshold: float | None,
        audit: AuditLog,
    ) -> None:
        self.name = name
        self.scorer = StreamScorer(method, window, image_threshold)
        self.audit = audit
        self.pixel_threshold = method.postprocessor.pixel_threshold
        self.scored: OrderedDict[str, Upload] = OrderedDict()
        self.scores: dict[str, float] = {}  # of the images scored, by SHA-256
        self.normal: set[str] = set()  # marked normal by an operator
        self.defects: set[str] = set()
        # a threshold calibrated for a stated false-alarm rate is recomputed from the
        # good set each time an operator changes it (calibration.conformal_threshold)
        promise = method.postprocessor.false_alarm or {}
        given = image_threshold is not None  # a threshold given by hand stays as given
        self.false_alarm_rate: float | None = None if given else promise.get("target")
        self._lock = threading.Lock()

    def score(self, uploads: Sequence[Upload]) -> list[StreamResult]:
        """Score what can be scored now (nothing while the cold start's set fills)."""
        items = [StreamItem(u.data, image_sha256(u.data), u.name, u.image) for u in uploads]
        with self._lock:
            for upload, item in zip(uploads, items, strict=True):
                self.scored[item.sha256] = upload
                self.scored.move_to_end(item.sha256)
            while len(self.scored) > KEPT_IMAGES:
                dropped, _ = self.scored.popitem(last=False)
                self.scores.pop(dropped, None)
            results = self.scorer.submit(items)
            for result in results:
                self.scores[result.item.sha256] = float(result.prediction.score)
            return results

    def thresholds(self) -> dict[str, float | None]:
        return {"image": self.scorer.admission_threshold, "pixel": self.pixel_threshold}

    def mark(self, sha256: str, verdict: str) -> dict[str, Any]:
        """An operator's verdict on a scored image; the audit line written."""
        if verdict not in MARKS:
            raise ValueError(f"a mark is one of {', '.join(MARKS)}, not {verdict!r}")
        with self._lock:
            upload = self.scored.get(sha256)
            if upload is None:
                raise StreamUnknownImage(f"stream {self.name} has scored no image {sha256}")
            if verdict == "normal":
                self.defects.discard(sha256)
                self.normal.add(sha256)
                member = BankMember(sha256, upload.data, upload.name)
                return self._change(sha256, verdict, lambda: self.scorer.bank.add(member))
            self.defects.add(sha256)
            self.normal.discard(sha256)
            self.scorer.refused.add(sha256)
            return self._change(sha256, verdict, lambda: self.scorer.bank.remove(sha256))

    def undo(self, version: str) -> dict[str, Any]:
        """Go back to bank version ``version``; the audit line written."""
        with self._lock:
            return self._change(None, "undo", lambda: self.scorer.bank.restore(version))

    def _change(
        self, sha256: str | None, verdict: str, change: Callable[[], str]
    ) -> dict[str, Any]:
        before, thresholds = self.scorer.bank.id, self.thresholds()
        after = change()
        self._recalibrate()
        return self.audit.append(
            sha256=sha256 or "",
            verdict=verdict,
            bank_before=before,
            bank_after=after,
            thresholds_before=thresholds,
            thresholds_after=self.thresholds(),
            stream=self.name,
        )

    def _recalibrate(self) -> None:
        """The image threshold for the stated false-alarm rate, from the good set as it
        now is (the bank's members and the images marked normal, never those marked
        defect); the log says how it moved. Too few good images keep the threshold."""
        rate = self.false_alarm_rate
        if rate is None:
            return
        good = {m.sha256 for m in self.scorer.bank.members} | self.normal
        values = [self.scores[sha] for sha in sorted(good - self.defects) if sha in self.scores]
        if len(values) < needed_for(rate):
            return
        threshold, _ = conformal_threshold(np.array(values), rate)
        logger.info(
            "stream %s: image threshold %s -> %.6g (false-alarm rate %g, %d good images)",
            self.name,
            "none" if self.scorer.given_threshold is None else f"{self.scorer.given_threshold:.6g}",
            threshold,
            rate,
            len(values),
        )
        self.scorer.given_threshold = threshold

    def describe(self) -> dict[str, Any]:
        bank = self.scorer.bank.describe()
        return {
            "name": self.name,
            "method": self.scorer.method.method,
            "bank": bank,
            "cold_start_waiting": len(self.scorer.pending),
            "thresholds": self.thresholds(),
            "marked_defect": sorted(self.defects),
        }
