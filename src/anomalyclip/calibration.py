"""Choosing the image and pixel thresholds from example images.

The rules, in order of preference:

* **Image threshold, with labelled anomalous images**: the F1-optimal threshold. Every
  cut between two distinct scores is tried (verdict: ``score >= threshold``); the best F1
  wins, ties going to the higher threshold (fewer false alarms), and the threshold is put
  midway between the lowest score called anomalous and the highest called normal, so it
  does not sit on a calibration image's score.
* **Image threshold, from good images only**: the ``image_quantile`` (default 0.99)
  quantile of their scores, numpy's linear interpolation. It is the threshold at which
  about 1 - q of good images raise a false alarm. With n good images and q >= (n-1)/n this
  is their maximum score; a new good image exceeds the maximum of n others with
  probability 1/(n+1), so a handful of 10 images means roughly 9% false alarms, and the
  rate falls only as more good images are given.
* **Image threshold, with a stated false-alarm rate** ``a`` (``false_alarm_rate``; it
  takes precedence over the two rules above): split conformal. Of n good scores, the
  k-th smallest with k = ceil((n + 1)(1 - a)) is the cut, and a score above it is
  flagged. A new good image exchangeable with the n flags with probability at most
  (n + 1 - k) / (n + 1) <= a. Given these n images, the rate is Beta(n + 1 - k, k)
  distributed; its one-sided 95 % upper bound (the Clopper-Pearson bound for n - k
  alarms in n) is reported with it. With n + 1 < 1 / a no cut can keep the promise: it is
  refused, saying how many good images are needed.
* **Pixel threshold, with a stated false-alarm rate**: the same rule on the good images'
  per-image map maxima, so that a new good image shows no defect pixel with probability
  at most ``a``.
* **Pixel threshold, with masks**: the F1-optimal threshold over pixels (at model
  resolution) of the good images (all normal) and the anomalous images that have masks.
  An optimum that means nothing (F1 below :data:`PIXEL_F1_FLOOR`, or marking more than
  :data:`MOST_OF_THE_IMAGE` of the pixels) is refused, and the rule below used instead;
  the log and the result say so.
* **Pixel threshold, otherwise**: the ``pixel_quantile`` (default 0.999) quantile of the
  good images' map values: on a good image about 0.1% of the area is marked.

Each image contributes at most :data:`PIXELS_PER_IMAGE` map values (a seeded random
sample), so memory stays bounded over large sets.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalyclip.data.core import ANOMALOUS_LABELS, NORMAL_LABELS
from anomalyclip.data.core import parse_label as parse_dataset_label
from anomalyclip.data.paths import ALLOW_FLAG, is_inside
from anomalyclip.inputs import expand_sources, read_image_csv
from anomalyclip.inspection.run import iter_predictions
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.few_shot import IMAGE_SCORE_RULE as REFERENCE_IMAGE_SCORE
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.postprocess import describe_false_alarm
from anomalyclip.predictor import Predictor, SkippedImage
from anomalyclip.preprocess import ImageSource
from anomalyclip.utils.quoting import quoted

logger = logging.getLogger(__name__)

PIXELS_PER_IMAGE = 65_536
# An F1-optimal pixel threshold below this F1, or masking more than this share of the
# pixels, marks noise: the quantile rule is used instead.
PIXEL_F1_FLOOR = 0.2
MOST_OF_THE_IMAGE = 0.5
# The confidence of the reported upper bound on the false-alarm rate achieved.
BOUND_CONFIDENCE = 0.95


# Settings that change scores and maps: thresholds calibrated under others do not carry over.
CALIBRATION_SETTINGS = (
    "image_size",
    "features",
    "dpam_layers",
    "dpam_mode",
    "global_head",
    "sigma",
)


def calibration_settings(config: AnomalyCLIPConfig) -> dict[str, Any]:
    """The settings thresholds are calibrated under, as JSON-ready values."""
    data = config.to_dict()
    return {name: data[name] for name in CALIBRATION_SETTINGS}


@dataclass
class Calibration:
    """Chosen thresholds and how they were chosen."""

    image_threshold: float
    pixel_threshold: float
    image_method: str  # "quantile" or "f1"
    pixel_method: str  # "quantile" or "f1"
    n_good: int
    n_anomalous: int
    n_masks: int
    image_quantile: float
    pixel_quantile: float
    image_f1: float | None = None
    pixel_f1: float | None = None
    good_score_max: float | None = None
    false_alarm: dict[str, Any] | None = None  # what a conformal cut promises (see module)
    pixel_f1_refused: str | None = None  # why an F1-optimal pixel threshold was not used
    skipped: list[SkippedImage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [s.to_record() for s in self.skipped]
        return data

    def apply(self, model: AnomalyCLIP, reference_bank: str | None = None) -> AnomalyCLIP:
        """Store the thresholds, and the settings they hold for, in the model's configuration
        (saved with its checkpoint). ``reference_bank``: the digest of the references the
        thresholds were calibrated with (few-shot maps differ from zero-shot ones)."""
        config = model.config
        settings = calibration_settings(config)
        if reference_bank is not None:
            settings["reference_bank"] = reference_bank
            # the rule the image scores it was calibrated on follow (few_shot.py)
            settings["reference_image_score"] = REFERENCE_IMAGE_SCORE
        extra = {**config.extra, "calibrated_with": settings}
        extra.pop("false_alarm", None)
        if self.false_alarm is not None:
            extra["false_alarm"] = self.false_alarm
        model.config = config.replace(
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            extra=extra,
        )
        return model


def needed_for(rate: float) -> int:
    """The fewest good images a conformal cut at false-alarm rate ``rate`` needs:
    n + 1 >= 1 / rate."""
    return max(1, math.ceil(1.0 / rate - 1e-9) - 1)


def conformal_threshold(values: np.ndarray, rate: float) -> tuple[float, int]:
    """(threshold, k): the split-conformal cut at false-alarm rate ``rate`` of n good
    values, just above their k-th smallest, so that ``value >= threshold`` is ``value >
    k-th smallest`` (a tie with it is not flagged)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the false-alarm rate must be in (0, 1), got {rate}")
    ordered = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = ordered.size
    rank = math.ceil((n + 1) * (1.0 - rate) - 1e-9)  # 1e-9: (n+1)(1-a) is often an integer
    if rank > n:
        raise ValueError(
            f"{n} good images are too few for a false-alarm rate of {rate:g}: at least "
            f"{needed_for(rate)} are needed (n + 1 >= 1/{rate:g}); give more good images or "
            "a higher --false-alarm-rate"
        )
    return float(np.nextafter(ordered[rank - 1], np.inf)), rank


def false_alarm_promise(rate: float, n: int, rank: int) -> dict[str, Any]:
    """What a conformal cut at the ``rank``-th smallest of ``n`` good scores promises: the
    target, the expected rate (n + 1 - k) / (n + 1), and the one-sided upper bound at
    :data:`BOUND_CONFIDENCE` on the rate these n images achieve (Beta(n + 1 - k, k), the
    Clopper-Pearson bound for n - k alarms among n)."""
    from scipy.stats import beta

    above = n + 1 - rank
    return {
        "target": rate,
        "n_good": n,
        "rank": rank,
        "expected": above / (n + 1),
        "upper_bound": float(beta.ppf(BOUND_CONFIDENCE, above, rank)),
        "confidence": BOUND_CONFIDENCE,
        "applies_to": ["image", "pixel"],
    }


def parse_label(value: str | None, image: str | Path) -> bool:
    """True for an anomalous label, False for a good one (the datasets' rule,
    :func:`anomalyclip.data.core.parse_label`); anything else is an error."""
    label = parse_dataset_label(value or "")
    if label is None:
        raise ValueError(
            f"label {value!r} of {image} is neither good ({', '.join(sorted(NORMAL_LABELS))}) "
            f"nor anomalous ({', '.join(sorted(ANOMALOUS_LABELS))}) nor a probability in [0, 1]"
        )
    return bool(label)


def read_labels(
    path: str | Path, allow_outside_paths: bool = False
) -> tuple[list[Path], list[Path], dict[str, Path]]:
    """(good images, anomalous images, masks by anomalous image) from a CSV with columns
    ``image``, ``label`` and optionally ``mask``.

    Each path must lie in the CSV's folder once resolved (``../``, absolute paths and
    links out are refused, :mod:`anomalyclip.data.paths`) unless ``allow_outside_paths``.
    """
    good: list[Path] = []
    anomalous: list[Path] = []
    masks: dict[str, Path] = {}
    rows = read_image_csv(path)
    if not allow_outside_paths:
        base = Path(path).parent
        for row in rows:
            for what, named in (("image", row.image), ("mask", row.mask)):
                if named is not None and not is_inside(named, base):
                    raise ValueError(
                        f"{path}: {what} {quoted(os.path.relpath(named, base))} is outside "
                        f"the folder of the labels file {base}; pass {ALLOW_FLAG} to read it "
                        "if you trust this file"
                    )
    for row in rows:
        if row.label is None:
            raise ValueError(f"{path}: {row.image} has no label (a 'label' column is needed)")
        if parse_label(row.label, row.image):
            anomalous.append(row.image)
            if row.mask is not None:
                masks[str(row.image)] = row.mask
        else:
            good.append(row.image)
    return good, anomalous, masks


def find_mask(image: Path, mask_root: Path) -> Path | None:
    """The mask of an image in the MVTec AD layout: ``<root>/<defect>/<stem>_mask.png``
    (``<stem>.png`` and the same directly under the root are accepted too)."""
    for folder in (mask_root / image.parent.name, mask_root):
        for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
            if (folder / name).is_file():
                return folder / name
    return None


def quantile_threshold(values: np.ndarray, quantile: float) -> float:
    """The ``quantile`` quantile of ``values`` (linear interpolation)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"a quantile must be in (0, 1], got {quantile}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to take a quantile of")
    return float(np.quantile(values, quantile))


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of ``score >= threshold`` against boolean labels."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    positives = int(labels.sum())
    if positives == 0:
        raise ValueError("F1 needs at least one anomalous example")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    true_positives = np.cumsum(hits)
    # Only cuts after the last of a run of tied scores: ties share a verdict.
    cuts = np.flatnonzero(np.r_[ranked[1:] < ranked[:-1], True])
    called = cuts + 1
    f1 = 2.0 * true_positives[cuts] / (called + positives)
    best = int(np.argmax(f1))  # first maximum: the highest threshold among ties
    cut = cuts[best]
    lowest_called = ranked[cut]
    threshold = lowest_called if cut + 1 == ranked.size else 0.5 * (lowest_called + ranked[cut + 1])
    return float(threshold), float(f1[best])


def _sample(values: np.ndarray, seed: int) -> np.ndarray:
    """At most PIXELS_PER_IMAGE indices into a flat array, the same for a given seed."""
    if values.size <= PIXELS_PER_IMAGE:
        return np.arange(values.size)
    return np.random.default_rng(seed).choice(values.size, PIXELS_PER_IMAGE, replace=False)


@dataclass
class _Examples:
    """What calibration keeps of each scored example: its score and label, and a sample
    of its map's pixels with their labels (from its mask; a good image's are normal)."""

    scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    pixel_values: list[np.ndarray] = field(default_factory=list)
    pixel_labels: list[np.ndarray] = field(default_factory=list)
    good_map_maxima: list[float] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    n_masks: int = 0


def _score_examples(
    model: Predictor,
    good_items: Sequence[ImageSource],
    anomalous_items: Sequence[ImageSource],
    masks: Mapping[str, Path],
    batch_size: int,
    progress: bool,
) -> _Examples:
    """The examples through the one scoring loop; anomalous images without a mask give
    an image score only."""
    labels = [False] * len(good_items) + [True] * len(anomalous_items)
    preprocessor = model.preprocessor
    examples = _Examples()
    items = [*good_items, *anomalous_items]
    outcomes = iter_predictions(model, items, batch_size, progress, description="calibrate")
    for outcome in outcomes:
        if isinstance(outcome, SkippedImage):
            examples.skipped.append(outcome)
            continue
        is_anomalous = labels[outcome.index]
        examples.scores.append(outcome.prediction.score)
        examples.labels.append(is_anomalous)
        mask_path = masks.get(str(items[outcome.index])) if is_anomalous else None
        if is_anomalous and mask_path is None:
            continue
        flat = outcome.prediction.anomaly_map.ravel()
        if not is_anomalous:
            examples.good_map_maxima.append(float(flat.max()))
        chosen = _sample(flat, outcome.index)
        examples.pixel_values.append(flat[chosen])
        if mask_path is not None:
            mask = preprocessor.load_mask(mask_path).numpy().ravel()
            examples.pixel_labels.append(mask[chosen] > 0.5)
            examples.n_masks += 1
        else:
            examples.pixel_labels.append(np.zeros(chosen.size, dtype=bool))
    return examples


def _pixel_rule(
    values: np.ndarray, truth: np.ndarray, n_masks: int, quantile: float
) -> tuple[float, str, float | None, str | None]:
    """(threshold, rule, F1, why F1 was refused): the F1 optimum over masked pixels when
    it means something, else the ``quantile`` of the good pixels."""
    fallback = quantile_threshold(values[~truth], quantile)
    if not (n_masks and truth.any()):
        return fallback, "quantile", None, None
    threshold, f1 = f1_optimal_threshold(values, truth)
    marked = float((values >= threshold).mean())
    if f1 >= PIXEL_F1_FLOOR and marked <= MOST_OF_THE_IMAGE:
        return threshold, "f1", f1, None
    reason = (
        f"the F1-optimal pixel threshold {threshold:.6g} has pixel F1 {f1:.3f} (below "
        f"{PIXEL_F1_FLOOR}) and marks {marked:.1%} of the pixels"
        if f1 < PIXEL_F1_FLOOR
        else f"the F1-optimal pixel threshold {threshold:.6g} marks {marked:.1%} of the "
        f"pixels (over {MOST_OF_THE_IMAGE:.0%}: most of the image)"
    )
    reason += (
        f"; used instead: the {quantile:g} quantile of the good images' map values, {fallback:.6g}"
    )
    logger.warning("%s", reason)
    return fallback, "quantile", f1, reason


def _warn_few(n_good: int, image_quantile: float) -> None:
    logger.warning(
        "%d good images: their %.3g quantile is close to their maximum score; expect "
        "about 1 in %d good images flagged (give more good images to lower that)",
        n_good,
        image_quantile,
        n_good + 1,
    )


def calibrate(
    model: Predictor,
    good: Sequence[ImageSource],
    anomalous: Sequence[ImageSource] = (),
    masks: Mapping[str, str | Path] | None = None,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    batch_size: int = 8,
    progress: bool = True,
    false_alarm_rate: float | None = None,
) -> Calibration:
    """Score the examples and choose thresholds by the rules in this module's docstring.

    ``good`` and ``anomalous`` may hold files, folders, globs or CSV lists; ``masks``
    maps an anomalous image's path (as a string) to its mask file. Unreadable images are
    skipped and listed in the result. The model is not changed: see
    :meth:`Calibration.apply`. ``false_alarm_rate``: both thresholds by the conformal rule.
    """
    for name, value in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    good_items, anomalous_items = expand_sources(good), expand_sources(anomalous)
    if not good_items:
        raise ValueError("calibration needs at least one known-good image")
    if false_alarm_rate is not None:  # refused before minutes of scoring, not after
        conformal_threshold(np.zeros(len(good_items)), false_alarm_rate)
    mask_paths = {str(k): Path(v) for k, v in (masks or {}).items()}
    examples = _score_examples(model, good_items, anomalous_items, mask_paths, batch_size, progress)
    scores_array = np.array(examples.scores)
    labels_array = np.array(examples.labels, dtype=bool)
    n_good = int((~labels_array).sum())
    n_anomalous = int(labels_array.sum())
    if n_good == 0:
        raise ValueError("none of the known-good images could be read")
    good_scores = scores_array[~labels_array]
    values = np.concatenate(examples.pixel_values)
    truth = np.concatenate(examples.pixel_labels)
    image_f1: float | None = None
    promise: dict[str, Any] | None = None
    pixel_f1: float | None = None
    refused: str | None = None
    if false_alarm_rate is not None:
        image_threshold, rank = conformal_threshold(good_scores, false_alarm_rate)
        pixel_threshold, _ = conformal_threshold(
            np.array(examples.good_map_maxima), false_alarm_rate
        )
        image_method = pixel_method = "conformal"
        promise = false_alarm_promise(false_alarm_rate, n_good, rank)
    else:
        if n_anomalous:
            image_threshold, image_f1 = f1_optimal_threshold(scores_array, labels_array)
            image_method = "f1"
        else:
            if n_good < 1.0 / max(1.0 - image_quantile, 1e-12):
                _warn_few(n_good, image_quantile)
            image_threshold, image_method = (
                quantile_threshold(good_scores, image_quantile),
                "quantile",
            )
        pixel_threshold, pixel_method, pixel_f1, refused = _pixel_rule(
            values, truth, examples.n_masks, pixel_quantile
        )
    result = Calibration(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        image_method=image_method,
        pixel_method=pixel_method,
        n_good=n_good,
        n_anomalous=n_anomalous,
        n_masks=examples.n_masks,
        image_quantile=image_quantile,
        pixel_quantile=pixel_quantile,
        image_f1=image_f1,
        pixel_f1=pixel_f1,
        good_score_max=float(good_scores.max()),
        false_alarm=promise,
        pixel_f1_refused=refused,
        skipped=examples.skipped,
    )
    _log_result(result)
    return result


def _log_result(result: Calibration) -> None:
    logger.info(
        "image threshold %.6g (%s), pixel threshold %.6g (%s) from %d good, %d anomalous "
        "images, %d masks",
        result.image_threshold,
        result.image_method,
        result.pixel_threshold,
        result.pixel_method,
        result.n_good,
        result.n_anomalous,
        result.n_masks,
    )
    if result.false_alarm is not None:
        logger.info("%s", describe_false_alarm(result.false_alarm))
