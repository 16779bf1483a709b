"""Evaluation metrics: the original evaluation's numbers, hand-computed cases, and property
tests against slow, plainly written loops (and scikit-learn, where it is installed)."""

from __future__ import annotations

import json
import logging
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from anomalyclip.evaluation import metrics
from anomalyclip.evaluation.metrics import (
    aupro,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# slow references: one threshold, one region, one pair at a time ----------------------------


def slow_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that an anomalous sample outscores a normal one, ties counting half."""
    wins = 0.0
    positives = [s for label, s in zip(labels, scores, strict=True) if label]
    negatives = [s for label, s in zip(labels, scores, strict=True) if not label]
    for positive in positives:
        for negative in negatives:
            wins += 1.0 if positive > negative else 0.5 if positive == negative else 0.0
    return wins / (len(positives) * len(negatives))


def slow_counts(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[int, int]:
    true_positives = false_positives = 0
    for label, score in zip(labels, scores, strict=True):
        if score >= threshold:
            true_positives += int(label)
            false_positives += int(not label)
    return true_positives, false_positives


def slow_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = int(sum(labels))
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        true_positives, false_positives = slow_counts(labels, scores, threshold)
        recall = true_positives / positives
        total += (recall - previous_recall) * true_positives / (true_positives + false_positives)
        previous_recall = recall
    return total


def slow_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = int(sum(labels))
    best = 0.0
    for threshold in set(scores.tolist()):
        true_positives, false_positives = slow_counts(labels, scores, threshold)
        if true_positives:
            precision = true_positives / (true_positives + false_positives)
            recall = true_positives / positives
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def regions_of(mask: np.ndarray) -> list[np.ndarray]:
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return [np.argwhere(labelled == region) for region in range(1, count + 1)]


def slow_aupro_original(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200, fpr_limit: float = 0.3
) -> float:
    """AnomalyCLIP's ``cal_pro_score``, loop for loop (scipy's labelling for scikit-image's)."""
    binary_maps = np.zeros_like(maps, dtype=bool)
    lowest, highest = maps.min(), maps.max()
    pros, fprs = [], []
    for threshold in np.arange(lowest, highest, (highest - lowest) / num_thresholds):
        binary_maps[maps <= threshold], binary_maps[maps > threshold] = 0, 1
        overlaps = []
        for binary_map, mask in zip(binary_maps, masks, strict=True):
            for coords in regions_of(mask):
                overlaps.append(binary_map[coords[:, 0], coords[:, 1]].sum() / len(coords))
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_maps).sum() / inverse_masks.sum())
        pros.append(np.mean(overlaps))
    fprs_array, pros_array = np.array(fprs), np.array(pros)
    kept = fprs_array < fpr_limit
    kept_fprs = fprs_array[kept]
    if len(set(kept_fprs.tolist())) < 2:
        return math.nan
    scaled = (kept_fprs - kept_fprs.min()) / (kept_fprs.max() - kept_fprs.min())
    return float(-np.trapezoid(pros_array[kept], scaled))


def slow_aupro_exact(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    regions = [(index, coords) for index, mask in enumerate(masks) for coords in regions_of(mask)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        binary = maps >= threshold
        overlaps = [binary[index][coords[:, 0], coords[:, 1]].mean() for index, coords in regions]
        points.append(((binary & normal).sum() / normal.sum(), float(np.mean(overlaps))))
    area = 0.0
    for (fpr_from, pro_from), (fpr_to, pro_to) in zip(points, points[1:], strict=False):
        if fpr_from >= fpr_limit:
            break
        if fpr_to > fpr_limit:
            pro_to = pro_from + (pro_to - pro_from) * (fpr_limit - fpr_from) / (fpr_to - fpr_from)
            fpr_to = fpr_limit
        area += (fpr_to - fpr_from) * (pro_from + pro_to) / 2
    return area / fpr_limit


# the original evaluation's numbers ------------------------------------------------------------


def test_reproduces_the_original_evaluation(shared_dir: Path) -> None:
    folder = shared_dir / "reference" / "metrics"
    inputs = np.load(folder / "metrics_inputs.npz")
    expected = json.loads((folder / "metrics_expected.json").read_text())
    masks, maps = inputs["masks"], inputs["maps"]
    assert maps.shape == (24, 160, 160) and maps.dtype == np.float32
    measured = {
        "image_auroc": image_auroc(inputs["labels"], inputs["scores"]),
        "image_ap": image_ap(inputs["labels"], inputs["scores"]),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_aupro": aupro(masks, maps),
    }
    assert measured.keys() == expected.keys()
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, abs=1e-6), name
    # the exact curve differs from the 200-step grid, but not by much on these maps
    assert aupro(masks, maps, method="exact") == pytest.approx(expected["pixel_aupro"], abs=0.01)


# hand-computed cases ----------------------------------------------------------------------------


def test_image_metrics_on_scikit_learn_documentation_example() -> None:
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    # recall steps 1/2 at precision 1 (score 0.8) and 1/2 at precision 2/3 (score 0.35)
    assert image_ap(labels, scores) == pytest.approx(5 / 6)
    # best at threshold 0.35: precision 2/3, recall 1
    assert image_f1_max(labels, scores) == pytest.approx(0.8)


def test_tied_scores_form_one_threshold() -> None:
    labels, scores = [0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]
    # pairs (0.9 > both), (0.5 vs 0.5: half), (0.5 > 0.2): 3.5 of 4
    assert image_auroc(labels, scores) == pytest.approx(0.875)
    # 0.9: P=1 R=1/2; tie at 0.5 enters together: P=2/3 R=1
    assert image_ap(labels, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert image_f1_max(labels, scores) == pytest.approx(0.8)


def test_perfect_and_inverted_rankings() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.arange(5.0)
    assert image_auroc(labels, scores) == 1.0
    assert image_ap(labels, scores) == 1.0
    assert image_f1_max(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_f1_max(labels, -scores) == pytest.approx(2 * 0.4 / 1.4)


def test_pixel_metrics_pool_every_pixel() -> None:
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.4, 0.5], [0.6, 0.7]]])
    # positives 0.9 and 0.7 against negatives 0.1..0.6: 6 + 6 wins of 12 pairs
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_ap(masks, maps) == 1.0
    maps[1, 1, 1] = 0.35  # now beats 0.1, 0.2, 0.3 only: 6 + 3 of 12
    assert pixel_auroc(masks, maps) == pytest.approx(9 / 12)
    # at 0.9: precision 1, recall 1/2; at 0.35: 2 of 5 flagged are anomalous, recall 1
    assert pixel_ap(masks.astype(bool), maps) == pytest.approx(0.5 * 1 + 0.5 * 0.4)
    assert pixel_f1_max(masks, maps) == pytest.approx(2 / 3)


# regions along one row: A = pixel 0 (area 1), B = pixels 2..4 (area 3); 10 normal pixels
ROW_MASK = np.array([[[1, 0, 1, 1, 1] + [0] * 9]], dtype=np.uint8)
ROW_MAP = np.array([[[0.9, 0.8, 0.9, 0.9, 0.2] + [0.1] * 9]])


def test_aupro_exact_weights_every_region_equally() -> None:
    # curve: (0, 5/6) at 0.9 [A whole, B two thirds], (0.1, 5/6) at 0.8, (0.1, 1) at 0.2
    assert aupro(ROW_MASK, ROW_MAP, method="exact") == pytest.approx((0.1 * 5 / 6 + 0.2) / 0.3)
    assert aupro(ROW_MASK, ROW_MAP, method="exact", fpr_limit=0.05) == pytest.approx(5 / 6)


def test_aupro_original_rescales_the_kept_fprs() -> None:
    # FPR takes only the values 0.1 (thresholds below 0.8) and 0 (above): rescaled to 1 and 0,
    # the one segment between them has PRO 5/6 at both ends, so PRO = 1 at FPR 0.1 is lost
    assert aupro(ROW_MASK, ROW_MAP) == pytest.approx(5 / 6)


def test_aupro_original_keeps_fprs_strictly_below_the_limit() -> None:
    # regions A = 0.9 and B = 0.75; normal pixels 0.8, 0.7, 0.7 and seven at 0.1
    masks = np.array([[[1, 0, 1] + [0] * 9]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.8, 0.75, 0.7, 0.7] + [0.1] * 7]])
    # thresholds below 0.7 have FPR exactly 0.3 (PRO 1) and are dropped; the kept FPRs
    # 0.1 and 0 rescale to 1 and 0, joined by one segment at PRO 1/2
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps, method="exact") == pytest.approx((0.1 * 0.5 + 0.2 * 1) / 0.3)


def test_aupro_regions_are_eight_connected() -> None:
    # one diagonal-touching region of 3 pixels; as two 4-connected regions PRO would be 1/2
    masks = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)
    maps = np.array([[1.0, 0.5, 0.5], [0.5, 0.0, 0.0], [0.5, 0.5, 0.5]])
    assert aupro(masks, maps, method="exact") == pytest.approx(1 / 3)
    # regions never join across images: two regions (3 and 4 pixels), one found; joined
    # through the shared centre pixel they would make one region with PRO 3/7
    stacked_masks = np.stack([np.eye(3), np.eye(3)[::-1]]).astype(np.uint8)
    stacked_masks[1, 0, 1] = 1
    found = np.array([1.0, 0.0])[:, None, None]
    stacked_maps = np.where(stacked_masks == 1, found, 0.5)
    assert aupro(stacked_masks, stacked_maps, method="exact") == pytest.approx(0.5)


def test_aupro_exact_is_close_to_the_original_on_smooth_maps() -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 96, 96), dtype=bool)
    rows, cols = np.mgrid[:96, :96]
    for image in masks:
        for _ in range(3):
            centre_row, centre_col, radius = rng.integers(12, 84), rng.integers(12, 84), 6
            image |= (rows - centre_row) ** 2 + (cols - centre_col) ** 2 < radius**2
    noise = rng.normal(size=masks.shape)
    maps = ndimage.gaussian_filter(masks * 0.5 + noise, sigma=(0, 2, 2))
    original, exact = aupro(masks, maps), aupro(masks, maps, method="exact")
    assert 0.5 < exact < 0.95
    assert exact == pytest.approx(original, abs=0.01)


def test_aupro_perfect_map() -> None:
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    assert aupro(masks, masks.astype(float), method="exact") == 1.0
    # on the grid every kept FPR is 0: nothing to rescale, so the original is undefined
    assert math.isnan(aupro(masks, masks.astype(float)))


# the 200-threshold grid, binned: against the loop over thresholds ------------------------------

DTYPES = [np.float32, np.float64]


def blob_masks(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Irregular blobs (several regions per image, touching diagonally at times), a third
    of the images normal."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 2, 2))
    masks = field > np.quantile(field, 0.85)
    masks[rng.random(shape[0]) < 1 / 3] = False
    masks[0, :2, :2] = True  # never all normal
    return masks.astype(np.uint8)


def grid_of(maps: np.ndarray, num_thresholds: int = 200) -> np.ndarray:
    lowest, highest = maps.min(), maps.max()
    return np.arange(lowest, highest, (highest - lowest) / num_thresholds)


def values_at_thresholds(thresholds: np.ndarray, dtype: type) -> np.ndarray:
    """Each threshold as the map's dtype can hold it, and the numbers of that dtype next to
    it on both sides: where ``map > threshold`` flips. For float32 maps the float64
    thresholds mostly fall between two float32 numbers, and both are here."""
    nearest = thresholds.astype(dtype)
    return np.concatenate(
        [
            nearest,
            np.nextafter(nearest, dtype(-np.inf)),
            np.nextafter(nearest, dtype(np.inf)),
        ]
    )


def tied_maps(rng: np.random.Generator, masks: np.ndarray, dtype: type) -> np.ndarray:
    """Every pixel exactly at a grid threshold or one float away from it, anomalous pixels
    more often high: the ties are where a binning by arithmetic alone would slip."""
    lowest, highest = dtype(-0.3), dtype(1.7)
    thresholds = np.arange(lowest, highest, (highest - lowest) / 200)
    candidates = np.unique(values_at_thresholds(thresholds, dtype))
    candidates = candidates[(candidates >= lowest) & (candidates <= highest)]
    low_choice = rng.choice(candidates, size=masks.shape)
    high_choice = rng.choice(candidates[candidates.size // 3 :], size=masks.shape)
    maps = np.where(masks == 1, high_choice, low_choice).astype(dtype)
    maps.flat[0], maps.flat[-1] = lowest, highest  # the grid the candidates came from
    assert np.array_equal(grid_of(maps), thresholds)
    return maps


def random_maps(rng: np.random.Generator, masks: np.ndarray, kind: str, dtype: type) -> np.ndarray:
    smooth = ndimage.gaussian_filter(masks * 0.8 + rng.normal(size=masks.shape), sigma=(0, 1, 1))
    if kind == "smooth":
        return smooth.astype(dtype)
    if kind == "quantised":  # a few levels, each shared by many pixels
        return (np.round(smooth * 3) / 3).astype(dtype)
    if kind == "at thresholds":
        return tied_maps(rng, masks, dtype)
    if kind == "constant images":  # some images one value: the lowest, a threshold, another
        maps = smooth.astype(dtype)
        thresholds = grid_of(maps)
        maps[1] = maps.min()
        maps[2] = thresholds[77]
        maps[3] = np.median(maps)
        return maps
    if kind == "only constant images":  # each image its own level k / 16, 0 and 1 included
        inner = rng.choice(np.arange(1, 16), masks.shape[0] - 2, replace=False)
        values = rng.permutation(np.r_[0, 16, inner]) / 16  # 1/8 = 25 steps: a tie
        return np.broadcast_to(values[:, None, None], masks.shape).astype(dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind", ["smooth", "quantised", "at thresholds", "constant images", "only constant images"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_aupro_equals_the_threshold_loop(seed: int, kind: str, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, (12, 20, 24))
    maps = random_maps(rng, masks, kind, dtype)
    expected = slow_aupro_original(masks, maps)
    assert not math.isnan(expected)  # a comparison of numbers, not of two NaNs
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_thresholds", "fpr_limit"), [(2, 1.0), (7, 0.5), (333, 0.3)])
def test_binned_aupro_on_other_grids_and_limits(
    dtype: type, num_thresholds: int, fpr_limit: float
) -> None:
    rng = np.random.default_rng(num_thresholds)
    masks = blob_masks(rng, (4, 18, 18))
    maps = random_maps(rng, masks, "smooth", dtype)
    expected = slow_aupro_original(masks, maps, num_thresholds, fpr_limit)
    measured = aupro(masks, maps, num_thresholds=num_thresholds, fpr_limit=fpr_limit)
    assert measured == pytest.approx(expected, abs=1e-9, nan_ok=True)


@pytest.mark.parametrize("block", [7, 64, 1 << 17])
def test_binned_aupro_does_not_depend_on_blocks_or_memory_layout(monkeypatch, block) -> None:
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, (3, 30, 26))
    maps = random_maps(rng, masks, "smooth", np.float32)
    expected = slow_aupro_original(masks, maps)
    monkeypatch.setattr(metrics, "_BLOCK", block)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    # a transposed stack is binned image by image, not copied whole
    transposed_masks = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    transposed_maps = np.ascontiguousarray(maps.transpose(0, 2, 1)).transpose(0, 2, 1)
    assert not transposed_maps.flags.c_contiguous
    assert aupro(transposed_masks, transposed_maps) == aupro(masks, maps)


def test_binned_aupro_of_integer_maps_equals_the_loop() -> None:
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, (4, 16, 16))
    maps = np.clip(random_maps(rng, masks, "smooth", np.float64) * 60 + 120, 0, 255)
    maps = maps.astype(np.uint8)
    assert aupro(masks, maps) == pytest.approx(slow_aupro_original(masks, maps), abs=1e-9)


def test_binned_aupro_searches_where_float_rounding_squeezes_the_grid(caplog) -> None:
    # float32 maps spanning 1e-38: the grid's step is subnormal, its inverse overflows
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, (3, 16, 16))
    smooth = random_maps(rng, masks, "smooth", np.float64)
    tiny = ((smooth - smooth.min()) / np.ptp(smooth) * 1e-38).astype(np.float32)
    with caplog.at_level(logging.DEBUG, logger="anomalyclip.evaluation.metrics"):
        assert aupro(masks, tiny) == pytest.approx(slow_aupro_original(masks, tiny), abs=1e-9)
    assert "searching instead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="anomalyclip.evaluation.metrics"):
        aupro(masks, smooth)
    assert "searching instead" not in caplog.text


def test_binned_aupro_of_constant_maps_is_undefined(caplog) -> None:
    masks = blob_masks(np.random.default_rng(0), (3, 8, 8))
    for dtype in DTYPES:
        with caplog.at_level(logging.WARNING, logger="anomalyclip.evaluation.metrics"):
            assert math.isnan(aupro(masks, np.full(masks.shape, 0.75, dtype)))
        assert "every map value equals 0.75" in caplog.text


# undefined and malformed input -------------------------------------------------------------


@pytest.mark.parametrize("metric", [image_auroc, image_ap, image_f1_max])
@pytest.mark.parametrize("label", [0, 1])
def test_one_class_labels_give_nan_and_a_warning(metric, label, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="anomalyclip.evaluation.metrics"):
        assert math.isnan(metric([label] * 4, [0.1, 0.2, 0.3, 0.4]))
    kind = "anomalous" if label else "normal"
    assert f"undefined: all 4 labels are {kind}" in caplog.text


def test_undefined_aupro_gives_nan_and_a_warning(caplog) -> None:
    maps = np.linspace(0, 1, 32).reshape(2, 4, 4)
    with caplog.at_level(logging.WARNING, logger="anomalyclip.evaluation.metrics"):
        assert math.isnan(aupro(np.zeros((2, 4, 4)), maps))
        assert math.isnan(aupro(np.ones((2, 4, 4)), maps))
        assert math.isnan(aupro(np.eye(4)[None], np.full((1, 4, 4), 0.25)))
        assert math.isnan(pixel_auroc(np.zeros((2, 4, 4)), maps))
    assert "no anomalous region" in caplog.text
    assert "no normal pixel" in caplog.text
    assert "every map value equals 0.25" in caplog.text
    assert "pixel AUROC is undefined: all 32 labels are normal" in caplog.text


def test_malformed_input_is_rejected_with_the_problem_named() -> None:
    with pytest.raises(ValueError, match=r"masks \(2, 4, 4\) and maps \(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"labels \(3,\) and scores \(4,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="scores contain 1 NaN or infinite"):
        image_ap([0, 1], [0.5, float("nan")])
    with pytest.raises(ValueError, match="maps contain 2 NaN or infinite"):
        aupro(np.eye(3)[None], np.array([[[np.inf, 0, 0], [0, np.nan, 0], [0, 0, 1]]]))
    with pytest.raises(ValueError, match="labels must be binary"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="masks must be binary"):
        pixel_ap(np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"masks must be binary .* such as \[  0 255\]"):
        aupro(np.array([[[0, 255]]], dtype=np.uint8), np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(H, W\)"):
        pixel_auroc(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="method must be 'original' or 'exact'"):
        aupro(np.eye(3), np.eye(3), method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
        aupro(np.eye(3), np.eye(3), fpr_limit=0.0)


# property tests against the slow loops ---------------------------------------------------------

TIED_VALUES = st.integers(-6, 6).map(lambda value: value / 4)  # exact fractions, many ties


@st.composite
def labelled_scores(draw) -> tuple[np.ndarray, np.ndarray]:
    size = draw(st.integers(2, 12))
    labels = draw(arrays(np.int64, size, elements=st.integers(0, 1)))
    assume(0 < labels.sum() < size)
    values = st.one_of(TIED_VALUES, st.floats(-3, 3, allow_subnormal=False))
    return labels, draw(arrays(np.float64, size, elements=values))


@st.composite
def masks_and_maps(draw) -> tuple[np.ndarray, np.ndarray]:
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(2, 5)))
    masks = draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    assume(0 < masks.sum() < masks.size)
    maps = draw(
        arrays(draw(st.sampled_from([np.float32, np.float64])), shape, elements=TIED_VALUES)
    )
    assume(maps.min() < maps.max())
    return masks, maps


@settings(max_examples=150, deadline=None)
@given(labelled_scores())
def test_image_metrics_match_slow_loops(data) -> None:
    labels, scores = data
    assert image_auroc(labels, scores) == pytest.approx(slow_auroc(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(slow_ap(labels, scores), abs=1e-12)
    assert image_f1_max(labels, scores) == pytest.approx(slow_f1_max(labels, scores), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(masks_and_maps())
def test_aupro_matches_slow_loops(data) -> None:
    masks, maps = data
    expected = slow_aupro_original(masks, maps)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9, nan_ok=True)
    assert aupro(masks, maps, method="exact") == pytest.approx(slow_aupro_exact(masks, maps))


@pytest.mark.skipif(find_spec("sklearn") is None, reason="scikit-learn is not installed")
@settings(max_examples=100, deadline=None)
@given(masks_and_maps())
def test_pixel_metrics_match_scikit_learn(data) -> None:
    from sklearn import metrics as sklearn_metrics

    masks, maps = data
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    expected_auroc = sklearn_metrics.roc_auc_score(flat_masks, flat_maps)
    expected_ap = sklearn_metrics.average_precision_score(flat_masks, flat_maps)
    assert pixel_auroc(masks, maps) == pytest.approx(expected_auroc, abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(expected_ap, abs=1e-12)
    assert pixel_f1_max(masks, maps) == pytest.approx(slow_f1_max(flat_masks, flat_maps))
