"""Evaluation metrics of anomaly detection, exact and vectorised, on NumPy arrays.

Image level: AUROC, average precision and the best F1 over all thresholds, from one score
and one label per image. Pixel level: the same over every pixel of (N, H, W) masks and
maps, plus AUPRO (area under the per-region-overlap curve).

AUROC and AP are defined as scikit-learn defines them (``roc_auc_score``,
``average_precision_score``; ties in the scores form one threshold, so tied
positive/negative pairs count one half in AUROC), since the original AnomalyCLIP
evaluation uses scikit-learn. They are computed here without it.

A metric that is undefined on its input (labels of one class only, no anomalous region,
a constant map) returns ``float("nan")`` and logs a warning, so per-class tables can show
"undefined" instead of stopping the evaluation. Malformed input (mismatched shapes,
non-binary labels, NaN or infinite scores) raises ``ValueError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

__all__ = [
    "aupro",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
]

logger = logging.getLogger(__name__)

AuproMethod = Literal["original", "exact"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# validation --------------------------------------------------------------------------------


def _binary(values: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if array.dtype.kind in "ui":
        binary = array.size == 0 or (array.min() >= 0 and array.max() <= 1)
    elif array.dtype.kind == "f":
        binary = bool(np.all((array == 0) | (array == 1)))
    else:
        binary = False
    if not binary:
        found = np.unique(array)[:5] if array.dtype.kind in "uif" else array.dtype
        raise ValueError(f"{what} must be binary (0/1 or bool); found values such as {found}")
    return array != 0


def _finite_scores(values: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "buif":
        raise ValueError(f"{what} must be real numbers, got dtype {array.dtype}")
    if array.dtype.kind != "f":
        return array.astype(np.float64)
    # min and max are NaN or infinite exactly when some value is, and cost no mask
    if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        nonfinite = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{what} contain {nonfinite} NaN or infinite value(s)")
    return array


def _image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels_array, scores_array = np.asarray(labels), np.asarray(scores)
    if labels_array.ndim != 1 or labels_array.shape != scores_array.shape:
        raise ValueError(
            "labels and scores must be 1-D arrays of the same length; got shapes "
            f"labels {labels_array.shape} and scores {scores_array.shape}"
        )
    if labels_array.size == 0:
        raise ValueError("labels and scores are empty")
    return _binary(labels_array, "labels"), _finite_scores(scores_array, "scores")


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Masks and maps as (N, H, W); a single (H, W) pair counts as one image."""
    masks_array, maps_array = np.asarray(masks), np.asarray(maps)
    if masks_array.shape != maps_array.shape:
        raise ValueError(
            f"masks and maps must have the same shape; got masks {masks_array.shape} "
            f"and maps {maps_array.shape}"
        )
    if masks_array.ndim not in (2, 3):
        raise ValueError(f"masks and maps must be (N, H, W) or (H, W); got {masks_array.shape}")
    if masks_array.size == 0:
        raise ValueError(f"masks and maps are empty (shape {masks_array.shape})")
    if masks_array.ndim == 2:
        masks_array, maps_array = masks_array[None], maps_array[None]
    return _binary(masks_array, "masks"), _finite_scores(maps_array, "maps")


def _undefined(metric: str, reason: str) -> float:
    logger.warning("%s is undefined: %s; returning NaN", metric, reason)
    return float("nan")


# threshold curves ---------------------------------------------------------------------------


class _SortedScores:
    """Anomalous and normal scores, each sorted: all that the threshold metrics need.

    Sorting the two groups apart (a plain sort) instead of ranking all scores together
    (an argsort) keeps pixel metrics over millions of pixels fast and small. Recall, hence
    AP and the best F1, only changes at anomalous scores; equal scores are one threshold,
    as in scikit-learn's ``_binary_clf_curve``.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        labels, scores = labels.ravel(), scores.ravel()
        self.positives = np.sort(scores[labels])
        self.negatives = np.sort(scores[~labels])

    def auroc(self) -> float:
        """Share of (anomalous, normal) pairs ranked right, ties counting half: the
        trapezoidal area under the ROC curve, counted exactly."""
        below = np.searchsorted(self.negatives, self.positives, side="left")
        at_or_below = np.searchsorted(self.negatives, self.positives, side="right")
        wins = 2 * int(below.sum()) + int((at_or_below - below).sum())
        return wins / (2 * self.positives.size * self.negatives.size)

    def counts_at_anomalous_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(true, false) positives at or above each distinct anomalous score, highest first."""
        first_of_each = np.r_[0, np.flatnonzero(np.diff(self.positives)) + 1][::-1]
        distinct = self.positives[first_of_each]
        true_positives = self.positives.size - first_of_each
        false_positives = self.negatives.size - np.searchsorted(self.negatives, distinct, "left")
        return true_positives, false_positives


def _one_class_reason(labels: np.ndarray) -> str | None:
    positives = int(np.count_nonzero(labels))
    if positives == 0:
        return f"all {labels.size} labels are normal (0)"
    if positives == labels.size:
        return f"all {labels.size} labels are anomalous (1)"
    return None


def _auroc(labels: np.ndarray, scores: np.ndarray, metric: str) -> float:
    reason = _one_class_reason(labels)
    if reason:
        return _undefined(metric, reason)
    return _SortedScores(labels, scores).auroc()


def _average_precision(labels: np.ndarray, scores: np.ndarray, metric: str) -> float:
    """Sum over thresholds of (recall step) x precision: scikit-learn's AP, no interpolation."""
    reason = _one_class_reason(labels)
    if reason:
        return _undefined(metric, reason)
    true_positives, false_positives = _SortedScores(labels, scores).counts_at_anomalous_scores()
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_max(labels: np.ndarray, scores: np.ndarray, metric: str) -> float:
    """Best F1 over every threshold; 2TP / (2TP + FP + FN) never divides by zero. A
    threshold between anomalous scores only adds false positives, so the best is at one."""
    reason = _one_class_reason(labels)
    if reason:
        return _undefined(metric, reason)
    true_positives, false_positives = _SortedScores(labels, scores).counts_at_anomalous_scores()
    positives = true_positives[-1]
    f1 = 2 * true_positives / (true_positives + false_positives + positives)
    return float(f1.max())


# image level ------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of per-image scores (NaN with a warning for one class)."""
    return _auroc(*_image_inputs(labels, scores), "image AUROC")


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of per-image scores, as ``sklearn.metrics.average_precision_score``.

    NaN with a warning for one class; scikit-learn would give 1.0 where every label is
    anomalous, a number that says nothing about the scores.
    """
    return _average_precision(*_image_inputs(labels, scores), "image AP")


def image_f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds of per-image scores (NaN with a warning for one class)."""
    return _f1_max(*_image_inputs(labels, scores), "image F1-max")


# pixel level ------------------------------------------------------------------------------


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over every pixel of (N, H, W) masks and anomaly maps."""
    return _auroc(*_pixel_inputs(masks, maps), "pixel AUROC")


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision over every pixel of (N, H, W) masks and anomaly maps."""
    return _average_precision(*_pixel_inputs(masks, maps), "pixel AP")


def pixel_f1_max(masks: ArrayLike, maps: ArrayLike) -> float:
    """Best F1 over all thresholds, over every pixel of (N, H, W) masks and anomaly maps."""
    return _f1_max(*_pixel_inputs(masks, maps), "pixel F1-max")


def _regions_of_each_image(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map value and region number (from 0) of every anomalous pixel.

    Labels only each image's bounding box of anomalous pixels, where all its regions lie,
    instead of the whole stack: most pixels of a test set are normal.
    """
    rows_hit, columns_hit = np.asarray(masks.any(axis=2)), np.asarray(masks.any(axis=1))
    values, regions, found_so_far = [], [], 0
    for index in np.flatnonzero(rows_hit.any(axis=1)):
        rows, columns = np.flatnonzero(rows_hit[index]), np.flatnonzero(columns_hit[index])
        box = (index, slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
        labelled, found = ndimage.label(masks[box], structure=_EIGHT_CONNECTED)
        anomalous = labelled > 0
        values.append(maps[box][anomalous])
        regions.append(labelled[anomalous] + (found_so_far - 1))
        found_so_far += found
    if not values:
        return np.empty(0, maps.dtype), np.empty(0, np.int64)
    return np.concatenate(values), np.concatenate(regions)


class _RegionOverlap:
    """Mean per-region overlap of the map above any threshold, from the anomalous pixels.

    Each anomalous pixel weighs 1 / (area of its region x number of regions), so the
    summed weight of the pixels above a threshold is the mean overlap over all regions.
    """

    def __init__(self, values: np.ndarray, regions: np.ndarray) -> None:
        num_regions = int(regions.max()) + 1
        areas = np.bincount(regions, minlength=num_regions)
        weights = 1.0 / (areas[regions] * float(num_regions))
        order = np.argsort(values)
        self.values = values[order]
        # weight_from[i]: summed weight of the sorted values from position i upwards
        self.weight_from = np.r_[np.cumsum(weights[order][::-1])[::-1], 0.0]

    def above(self, thresholds: np.ndarray) -> np.ndarray:
        return self.weight_from[np.searchsorted(self.values, thresholds, side="right")]

    def at_or_above(self, thresholds: np.ndarray) -> np.ndarray:
        return self.weight_from[np.searchsorted(self.values, thresholds, side="left")]


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    *,
    method: AuproMethod = "original",
    num_thresholds: int = 200,
    fpr_limit: float = 0.3,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to a false-positive rate.

    Every 8-connected region of every mask counts once, whatever its size, so small
    defects weigh as much as large ones. PRO at a threshold is the mean over regions of
    the fraction of the region's pixels above it; FPR is the fraction of normal pixels
    above it.

    ``method="original"`` (default) reproduces the AnomalyCLIP evaluation
    (``cal_pro_score``): thresholds ``numpy.arange(min, max, (max - min) / num_thresholds)``
    over all maps, binary = map > threshold, keep thresholds with FPR < ``fpr_limit``,
    rescale the kept FPRs to [0, 1] by their own min and max, trapezoidal area under PRO.
    That number depends on the threshold grid: the rescaling stretches whatever FPR span
    the grid happens to reach below the limit to the full [0, 1]. It is computed in time
    linear in the pixels, without sorting them: each pixel is binned among the thresholds
    once, and counts per bin give every threshold's PRO and FPR.

    ``method="exact"`` is threshold-free: the PRO curve through every distinct map value,
    from FPR 0 to exactly ``fpr_limit`` (the last segment interpolated linearly), area
    divided by ``fpr_limit``. It does not depend on a grid, so it compares across
    evaluations; on smooth maps, whose grid covers FPR 0 to the limit densely, it comes
    within about 0.01 of the default.
    """
    if method not in ("original", "exact"):
        raise ValueError(f"method must be 'original' or 'exact', got {method!r}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    masks_array, maps_array = _pixel_inputs(masks, maps)
    if maps_array.dtype not in (np.float32, np.float64):
        maps_array = maps_array.astype(np.float64)

    anomalous_values, regions = _regions_of_each_image(masks_array, maps_array)
    if anomalous_values.size == 0:
        return _undefined("AUPRO", "the masks contain no anomalous region")
    if anomalous_values.size == maps_array.size:
        return _undefined("AUPRO", "the masks contain no normal pixel")
    if method == "original":
        return _aupro_on_grid(maps_array, anomalous_values, regions, num_thresholds, fpr_limit)
    overlap = _RegionOverlap(anomalous_values, regions)
    return _aupro_exact(maps_array[~masks_array], overlap, fpr_limit)


_BLOCK = 1 << 17  # values per pass of the binning: its work arrays stay in cache


def _blocks(values: np.ndarray) -> Iterator[np.ndarray]:
    """1-D runs of at most ``_BLOCK`` values that together cover ``values``, views of it
    where it is contiguous: a short run goes through the binning's passes while in cache,
    and no copy of the whole stack is made."""
    if values.ndim > 1 and not values.flags.c_contiguous:
        for part in values:
            yield from _blocks(part)
        return
    flat = np.ascontiguousarray(values).reshape(-1)
    for start in range(0, flat.size, _BLOCK):
        yield flat[start : start + _BLOCK]


def _floor_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The largest number of ``dtype`` at or below each of ``values``.

    For ``x`` of that dtype, ``x > value`` (compared in the wider type, as NumPy compares a
    float32 map with a float64 threshold) exactly when ``x > floor``: no number of the
    dtype lies strictly between the floor and the value. So the binning compares in the
    map's own dtype and gets the same answer.
    """
    rounded = values.astype(dtype)
    return np.where(rounded > values, np.nextafter(rounded, dtype.type(-np.inf)), rounded)


class _GridBins:
    """Each value's bin on a threshold grid: the number of thresholds strictly below it.

    A value lies above threshold ``k`` (``value > threshold``, the original's binarisation)
    exactly when its bin exceeds ``k``, so a histogram of bins gives, by cumulative sums,
    how many values lie above every threshold at once.

    The grid is (almost) uniform, so arithmetic estimates the bin: ``(x - origin) * scale``
    truncated, the origin half a step below the lowest threshold. That estimate is either
    the bin or one below it, and one comparison with the threshold at the estimate settles
    which, ties included. The claim is checked, not assumed: the estimate is a
    non-decreasing function of ``x`` (subtraction and multiplication by constants round
    monotonically), so checking it at the thresholds and the values just above them
    bounds it at every value in between. Where the check fails (a grid whose thresholds
    float rounding has squeezed together) each value is searched among the thresholds.
    """

    def __init__(
        self, thresholds: np.ndarray, dtype: np.dtype, step: float, highest: float
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.bounds = _floor_to(thresholds, self.dtype)
        self.count = self.bounds.size + 1
        self._table = np.r_[self.bounds, np.array([np.inf], self.dtype)]
        typed_step = self.dtype.type(step)
        with np.errstate(all="ignore"):
            self._origin = self.dtype.type(thresholds[0]) - typed_step / self.dtype.type(2)
            self._scale = self.dtype.type(1) / typed_step
        self._estimates_hold = self._estimate_is_within_one(highest)
        if not self._estimates_hold:
            logger.debug("AUPRO grid too uneven for arithmetic binning; searching instead")

    def _estimate(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return (values - self._origin) * self._scale

    def _estimate_is_within_one(self, highest: float) -> bool:
        """Whether every value from the lowest threshold to ``highest`` gets an estimate
        in {bin - 1, bin}, from the estimates at the ends of every bin."""
        bounds, size = self.bounds, self.bounds.size
        if not (np.all(bounds[1:] >= bounds[:-1]) and np.isfinite(self._scale)):
            return False
        # the lowest value of each bin above the first: just above the threshold below it
        just_above = np.nextafter(bounds, self.dtype.type(np.inf))
        reached = just_above <= highest
        points = np.r_[bounds, just_above[reached], np.array([highest], self.dtype)]
        estimates = self._estimate(points.astype(self.dtype))
        if not (np.all(np.isfinite(estimates)) and estimates.min() >= 0):
            return False
        if estimates.max() >= self.count:
            return False
        estimates = estimates.astype(np.intp)
        thresholds_below = np.arange(size)
        at_bounds, above_bounds = estimates[:size], estimates[size:-1]
        return bool(
            np.all(at_bounds <= thresholds_below)  # bound k is in bin k
            and np.all(above_bounds >= thresholds_below[reached])  # just above: bin k + 1
            and estimates[-1] <= size
        )

    def histogram(self, values: np.ndarray) -> np.ndarray:
        """How many of ``values`` lie in each bin (``count`` bins)."""
        counts = np.zeros(self.count, dtype=np.int64)
        buffers = _BinBuffers(min(values.size, _BLOCK), self.dtype)
        for block in _blocks(values):
            counts += np.bincount(self._bins_of_block(block, buffers), minlength=self.count)
        return counts

    def bins(self, values: np.ndarray) -> np.ndarray:
        """The bin of every one of ``values`` (1-D), for grouping them further."""
        flat = np.ascontiguousarray(values).reshape(-1)
        result = np.empty(flat.size, dtype=np.intp)
        buffers = _BinBuffers(min(flat.size, _BLOCK), self.dtype)
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            result[start : start + block.size] = self._bins_of_block(block, buffers)
        return result

    def _bins_of_block(self, block: np.ndarray, buffers: _BinBuffers) -> np.ndarray:
        if not self._estimates_hold:
            return np.searchsorted(self.bounds, block, side="left")
        size = block.size
        estimate, bins = buffers.estimate[:size], buffers.bins[:size]
        bound, above = buffers.bound[:size], buffers.above[:size]
        np.subtract(block, self._origin, out=estimate)
        np.multiply(estimate, self._scale, out=estimate)
        np.copyto(bins, estimate, casting="unsafe")  # truncation; the estimates are >= 0
        np.take(self._table, bins, out=bound, mode="clip")
        np.less(bound, block, out=above)
        bins += above
        return bins


class _BinBuffers:
    """Work arrays of one block, reused from block to block rather than allocated anew."""

    def __init__(self, size: int, dtype: np.dtype) -> None:
        self.estimate = np.empty(size, dtype)
        self.bound = np.empty(size, dtype)
        self.bins = np.empty(size, np.intp)
        self.above = np.empty(size, bool)


def _aupro_on_grid(
    maps: np.ndarray,
    anomalous_values: np.ndarray,
    regions: np.ndarray,
    num_thresholds: int,
    fpr_limit: float,
) -> float:
    lowest, highest = maps.min(), maps.max()
    if lowest == highest:
        return _undefined("AUPRO", f"every map value equals {lowest}")
    step = (highest - lowest) / num_thresholds
    if not 0 < step < np.inf:
        return _undefined("AUPRO", f"no threshold grid fits the map range {lowest}..{highest}")
    # arange with a positive step is non-decreasing already; sorting states what the
    # binning relies on, at no cost to the order of the curve
    thresholds = np.sort(np.arange(lowest, highest, step))

    grid = _GridBins(thresholds, maps.dtype, step, highest)
    # pixels in bin b lie above thresholds 0..b-1: above threshold k are bins k+1 and up
    all_above = np.cumsum(grid.histogram(maps)[::-1])[::-1][1:]
    num_regions = int(regions.max()) + 1
    per_region_and_bin = np.bincount(
        regions * grid.count + grid.bins(anomalous_values), minlength=num_regions * grid.count
    ).reshape(num_regions, grid.count)
    areas = per_region_and_bin.sum(axis=1)
    anomalous_above = np.cumsum(per_region_and_bin.sum(axis=0)[::-1])[::-1][1:]
    # summed over regions first, bin by bin, so no regions x thresholds array of hits
    overlap_per_bin = (per_region_and_bin / areas[:, None]).sum(axis=0) / num_regions
    pro = np.cumsum(overlap_per_bin[::-1])[::-1][1:]
    normal_pixels = maps.size - anomalous_values.size
    fpr = (all_above - anomalous_above) / normal_pixels

    kept = fpr < fpr_limit
    kept_fpr, kept_pro = fpr[kept], pro[kept]
    if kept_fpr.size < 2 or kept_fpr.min() == kept_fpr.max():
        return _undefined(
            "AUPRO",
            f"fewer than two thresholds of the {thresholds.size}-step grid have distinct "
            f"FPRs below {fpr_limit}",
        )
    scaled_fpr = (kept_fpr - kept_fpr.min()) / (kept_fpr.max() - kept_fpr.min())
    # FPR falls as the threshold rises: integrate in the reverse direction, as sklearn's auc.
    return float(-np.sum(np.diff(scaled_fpr) * (kept_pro[1:] + kept_pro[:-1]) / 2.0))


def _aupro_exact(normal_values: np.ndarray, overlap: _RegionOverlap, fpr_limit: float) -> float:
    """Trapezoids of the step curve, one per distinct normal value, highest first.

    FPR moves only at normal values: between two of them the curve rises vertically
    (anomalous pixels alone, no area), and at one it runs from (FPR before, PRO above the
    value) to (FPR after, PRO at or above it), a slanted side where the value is tied.
    """
    # Only the normal values above the limit's quantile (and its ties) reach the curve.
    normal_pixels = normal_values.size
    needed = min(normal_pixels, int(np.ceil(fpr_limit * normal_pixels)) + 1)
    cutoff = np.partition(normal_values, normal_pixels - needed)[normal_pixels - needed]
    ascending = np.sort(normal_values[normal_values >= cutoff])
    first_of_each_value = np.r_[0, np.flatnonzero(np.diff(ascending)) + 1]
    distinct = ascending[first_of_each_value]
    # highest value first: FPR grows along the arrays
    fpr_after = ((ascending.size - first_of_each_value) / normal_pixels)[::-1]
    fpr_before = np.r_[0.0, fpr_after[:-1]]
    pro_before = overlap.above(distinct)[::-1]
    pro_after = overlap.at_or_above(distinct)[::-1]

    # the lowest kept value has FPR past the limit, so the curve crosses it at some value
    crossing = int(np.argmax(fpr_after >= fpr_limit))
    share = (fpr_limit - fpr_before[crossing]) / (fpr_after[crossing] - fpr_before[crossing])
    fpr_after[crossing] = fpr_limit
    pro_after[crossing] = pro_before[crossing] + share * (
        pro_after[crossing] - pro_before[crossing]
    )
    widths = fpr_after[: crossing + 1] - fpr_before[: crossing + 1]
    heights = (pro_before[: crossing + 1] + pro_after[: crossing + 1]) / 2.0
    return float(np.sum(widths * heights) / fpr_limit)
