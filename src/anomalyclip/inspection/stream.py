"""Scoring images one at a time as a line produces them, for every method.

The one implementation behind ``anomalyclip watch`` and the service's streams
(``POST /v1/streams/{name}/images``): a :class:`StreamScorer` takes images as they come
and gives each its result with the identity and size of the bank it was scored against.

* A per-image method scores each image alone (against its references once operators
  have marked images normal: the bank).
* A method whose images score each other (MuSc; AnomalyDINO without references) keeps a
  **rolling bank** of the last ``window`` images judged normal. The first ``window``
  images are scored as one set, which seeds the bank (the cold start, said in the log);
  every later image is scored alone against the bank through the method's reference
  mode (:func:`anomalyclip.methods.assemble.with_references`), so no set is needed.
* An image whose score reaches the admission threshold never enters the bank, so defects
  do not teach the method that they are normal. The threshold is the given or
  calibrated image threshold; without one, the seed's own edge of normal variation: the
  largest score a seed image gets against the other seed images (leave one out), the
  same rule every reference mode's ``r / (1 + r)`` uses.

Reference-mode scores are on the method's reference scale (MuSc: raw distances), not
the cold start's set scale (RsCIN's [0, 1]): results carry their ``phase`` so the two
are never compared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from anomalyclip.inspection.bank import BankMember, ImageBank
from anomalyclip.methods import METHODS
from anomalyclip.methods.assemble import with_references
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import ImageSource

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_WINDOW", "StreamItem", "StreamResult", "StreamScorer"]

DEFAULT_WINDOW = 32

# phases a result can come from
COLD_START = "cold-start"
AGAINST_BANK = "bank"
ALONE = "alone"


@dataclass(frozen=True)
class StreamItem:
    """An image that arrived: where it is (a path, or its bytes), its content digest and
    the decoded pixels."""

    source: ImageSource
    sha256: str
    name: str
    image: Image.Image


@dataclass
class StreamResult:
    """One image's result and the bank it was judged with."""

    item: StreamItem
    prediction: AnomalyPrediction
    phase: str  # COLD_START, AGAINST_BANK or ALONE
    bank_id: str  # the bank it was scored against (the seed's, for the cold start)
    bank_size: int
    admitted: bool  # it joined the bank
    admission_threshold: float | None

    def extra_fields(self) -> dict[str, Any]:
        """What a run folder's record adds to ``predict``'s fields."""
        return {
            "sha256": self.item.sha256,
            "phase": self.phase,
            "bank_id": self.bank_id,
            "bank_size": self.bank_size,
            "bank_admitted": self.admitted,
            "admission_threshold": self.admission_threshold,
        }


ReferenceMode = Callable[[Predictor, Sequence[ImageSource]], Predictor]


def _check_calibrated_scale(method: Predictor) -> None:
    """Refuse a calibrated image threshold that a rolling bank would compare with scores
    on another scale: MuSc calibrated on sets (RsCIN's 0-1 over the set) scores later
    images against its bank in raw distances, so the threshold would judge, and admit
    to the bank, by a number that means something else there."""
    entry = METHODS.get(method.method)
    threshold = method.postprocessor.image_threshold
    if (
        threshold is None
        or not method.scores_sets
        or entry is None
        or entry.set_scores_match_references
    ):
        return
    raise ValueError(
        f"{method.method}'s calibrated image threshold {threshold:.4g} was set on scores of "
        "sets, but a rolling bank scores each later image against the bank on another "
        "scale (raw distances): give --threshold on that scale, or calibrate with "
        "--reference and score against that bank"
    )


class StreamScorer:
    """Images in as they come, results out; the rolling bank in between (see module)."""

    def __init__(
        self,
        method: Predictor,
        window: int = DEFAULT_WINDOW,
        image_threshold: float | None = None,
        reference_mode: ReferenceMode = with_references,
    ) -> None:
        if window < 2 and method.scores_sets:
            raise ValueError(f"--window must be at least 2 for {method.method}, got {window}")
        if image_threshold is None:
            _check_calibrated_scale(method)
        self.method = method
        self.window = window
        self.bank = ImageBank(window=window if method.scores_sets else None)
        self.given_threshold = (
            image_threshold if image_threshold is not None else method.postprocessor.image_threshold
        )
        self.seed_edge: float | None = None
        self.pending: list[StreamItem] = []  # the cold start, until the set is full
        self.refused: set[str] = set()  # marked defect by an operator: never admitted
        self._reference_mode = reference_mode
        self._scorer: tuple[str, Predictor] | None = None
        # the features of bank images (and the seed's) by content digest, for a method
        # that encodes references one by one: an admission encodes the new image only
        self._encoded: dict[str, Any] = {}

    @property
    def seeded(self) -> bool:
        return not self.method.scores_sets or self.bank.size > 0

    @property
    def admission_threshold(self) -> float | None:
        return self.given_threshold if self.given_threshold is not None else self.seed_edge

    def submit(self, items: Sequence[StreamItem]) -> list[StreamResult]:
        """Score what can be scored now: every item, or nothing while the cold start's
        set is filling (the items are kept for it)."""
        results: list[StreamResult] = []
        for item in items:
            if self.seeded:
                results.append(self._score_one(item))
                continue
            self.pending.append(item)
            if len(self.pending) == 1:
                logger.info(
                    "cold start: %s scores sets; the first %d images are scored as one set "
                    "to seed its bank",
                    self.method.method,
                    self.window,
                )
            if len(self.pending) >= self.window:
                results += self.seed()
        return results

    def seed(self) -> list[StreamResult]:
        """Score the waiting images as one set and seed the bank with those judged normal
        (also what ``--once`` does with a cold start that never filled)."""
        items, self.pending = self.pending, []
        if not items:
            return []
        if len(items) < 2:
            self.pending = items
            logger.warning(
                "%s: a set needs at least 2 images; %s waits for another",
                self.method.method,
                items[0].name,
            )
            return []
        predictions = self.method.predict_images([item.image for item in items])
        if self.given_threshold is None:
            self.seed_edge = self._leave_one_out_edge(items)
        threshold = self.admission_threshold
        seed_bank = self.bank.id
        results = []
        for item, prediction in zip(items, predictions, strict=True):
            admitted = self.given_threshold is None or prediction.score < self.given_threshold
            if admitted:
                self.bank.add(BankMember(item.sha256, item.source, item.name))
            results.append(
                StreamResult(item, prediction, COLD_START, seed_bank, 0, admitted, threshold)
            )
        if not self.bank.size:
            logger.warning(
                "cold start: no image of the set scored below %s; the next %d start again",
                threshold,
                self.window,
            )
            return results
        logger.info(
            "cold start done: %d images scored as one set, %d in the bank (%s); each later "
            "image is scored against it, entering it below %s",
            len(items),
            self.bank.size,
            self.bank.id,
            "?" if threshold is None else f"{threshold:.4g}",
        )
        return results

    def _leave_one_out_edge(self, items: Sequence[StreamItem]) -> float:
        """The largest score a seed image gets against the others: the seed's edge of
        normal variation, the admission threshold when none is given."""
        scores = []
        for index, item in enumerate(items):
            others = [
                (other.sha256, other.source)
                for position, other in enumerate(items)
                if position != index
            ]
            scorer = self._against(others)
            scores.append(scorer.predict_images([item.image])[0].score)
        edge = max(scores)
        logger.info(
            "no image threshold given or calibrated: images enter the bank below %.4g, the "
            "largest leave-one-out score of the seed",
            edge,
        )
        return edge

    def scorer(self) -> Predictor:
        """What scores an image now: the method against its bank, or alone."""
        if self.bank.size == 0:
            return self.method
        if self._scorer is None or self._scorer[0] != self.bank.id:
            members = [(member.sha256, member.source) for member in self.bank.members]
            self._scorer = (self.bank.id, self._against(members))
            # images that left the bank are forgotten (an undo encodes them again)
            kept = {digest for digest, _ in members}
            self._encoded = {d: f for d, f in self._encoded.items() if d in kept}
        return self._scorer[1]

    def _against(self, references: Sequence[tuple[str, ImageSource]]) -> Predictor:
        """The method against these (content digest, source) references. A method whose
        reference mode encodes images one by one encodes only those not encoded before,
        where rebuilding encoded the whole window at every admission; the bank is the
        one the reference mode builds whole."""
        entry = METHODS.get(self.method.method)
        encode = None if entry is None else entry.encode_references
        build = None if entry is None else entry.references_from_encoded
        sources = [source for _, source in references]
        if encode is None or build is None:
            return self._reference_mode(self.method, sources)
        method, wrap = self.method.layers()  # as with_references: under any wrapper
        new = {digest: source for digest, source in references if digest not in self._encoded}
        if new:
            self._encoded.update(zip(new, encode(method, list(new.values())), strict=True))
        return wrap(build(method, [self._encoded[digest] for digest, _ in references], sources))

    def _score_one(self, item: StreamItem) -> StreamResult:
        bank_id, bank_size = self.bank.id, self.bank.size
        (prediction,) = self.scorer().predict_images([item.image])
        phase = AGAINST_BANK if bank_size else ALONE
        threshold = self.admission_threshold
        admitted = (
            self.method.scores_sets
            and threshold is not None
            and prediction.score < threshold
            and item.sha256 not in self.refused
        )
        if admitted:
            self.bank.add(BankMember(item.sha256, item.source, item.name))
        return StreamResult(item, prediction, phase, bank_id, bank_size, admitted, threshold)

    def replay(self, record: dict[str, Any], source: ImageSource) -> None:
        """Rebuild the bank from a result written earlier (a resumed run): the images it
        admitted rejoin in the same order, the seed's edge is taken back."""
        if record.get("phase") == COLD_START:
            edge = record.get("admission_threshold")
            if self.given_threshold is None and edge is not None:
                self.seed_edge = float(edge)
        if record.get("bank_admitted"):
            self.bank.add(BankMember(str(record["sha256"]), source, str(record["image"])))
