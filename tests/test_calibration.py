"""Threshold rules on hand-made numbers, on real tiles, and through the CLI into predict."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from anomalyclip.calibration import (
    ANOMALOUS_LABELS,
    calibrate,
    f1_optimal_threshold,
    find_mask,
    parse_label,
    quantile_threshold,
    read_labels,
)
from anomalyclip.methods.anomalyclip.checkpoint import read_checkpoint
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from tests.factories import tiny_clip
from tests.helpers import (
    IMAGE_SIZE,
    TILE,
    cli,
    copy_tiles,
    model_arguments,
    tiny_config,
    write_tiny_model,
)


def brute_force_f1(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    called = scores >= threshold
    true_positives = int((called & labels).sum())
    return 2 * true_positives / (called.sum() + labels.sum())


def test_f1_threshold_separates_separable_scores_midway():
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.4])
    labels = np.array([0, 1, 0, 1, 0, 1], bool)
    threshold, f1 = f1_optimal_threshold(scores, labels)
    assert threshold == pytest.approx(0.35) and f1 == 1.0


def test_f1_threshold_is_the_best_cut_on_random_scores():
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding makes ties
    threshold, f1 = f1_optimal_threshold(scores, labels)
    assert brute_force_f1(scores, labels, threshold) == pytest.approx(f1)
    best = max(brute_force_f1(scores, labels, t) for t in np.unique(scores))
    assert f1 == pytest.approx(best)
    assert threshold not in set(scores)  # midway between two scores, not on one


def test_f1_threshold_keeps_tied_scores_together_and_needs_positives():
    # A cut inside the tie at 0.5 would score F1 1.0 but is impossible.
    scores = np.array([0.5, 0.5, 0.1])
    labels = np.array([True, False, False])
    threshold, f1 = f1_optimal_threshold(scores, labels)
    assert threshold == pytest.approx(0.3) and f1 == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="F1 needs at least one anomalous example"):
        f1_optimal_threshold(scores, np.zeros(3, bool))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        f1_optimal_threshold(scores, np.ones(2, bool))


def test_f1_threshold_calls_everything_anomalous_when_that_is_best():
    threshold, f1 = f1_optimal_threshold(np.array([0.2, 0.6]), np.array([True, True]))
    assert threshold == 0.2 and f1 == 1.0


def test_quantile_threshold_of_a_handful_is_near_their_maximum():
    values = np.arange(10.0)
    assert quantile_threshold(values, 0.99) == pytest.approx(8.91)
    assert quantile_threshold(values, 1.0) == 9.0
    with pytest.raises(ValueError, match=r"a quantile must be in \(0, 1\], got 1.5"):
        quantile_threshold(values, 1.5)
    with pytest.raises(ValueError, match="no values"):
        quantile_threshold(np.array([]), 0.5)


def test_labels_are_parsed_strictly():
    assert parse_label(" Good ", "a.png") is False and parse_label("NG", "a.png") is True
    assert all(parse_label(label, "x") for label in ANOMALOUS_LABELS)
    with pytest.raises(ValueError, match="label 'maybe' of a.png is neither good"):
        parse_label("maybe", "a.png")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("0.0", 0),
        ("1.0", 1),
        ("0.333", 0),
        ("0.5", 1),
        ("0.667", 1),
        ("ok", 0),
        ("NG", 1),
        ("1.5", None),
        ("nan", None),
        ("-0.1", None),
        ("maybe", None),
    ],
)
def test_one_label_rule_for_manifests_and_calibration(text, label):
    """Bug: 0.0/1.0 and probabilities were refused in CSV manifests."""
    from anomalyclip.data.core import parse_label as dataset_label

    assert dataset_label(text) == label
    if label is None:
        with pytest.raises(ValueError, match="nor a probability in"):
            parse_label(text, "x.png")
    else:
        assert parse_label(text, "x.png") is bool(label)


def test_read_labels_splits_good_and_anomalous_with_masks(tmp_path):
    listing = tmp_path / "labels.csv"
    listing.write_text("image,label,mask\ng.png,good,\nd.png,defect,gt/d_mask.png\ne.png,1,\n")
    good, anomalous, masks = read_labels(listing)
    assert good == [tmp_path / "g.png"]
    assert anomalous == [tmp_path / "d.png", tmp_path / "e.png"]
    assert masks == {str(tmp_path / "d.png"): tmp_path / "gt" / "d_mask.png"}
    listing.write_text("image\ng.png\n")
    with pytest.raises(ValueError, match="g.png has no label"):
        read_labels(listing)


def test_find_mask_follows_the_mvtec_layout(shared_dir):
    image = shared_dir / TILE / "test" / "crack" / "exp1_num_249594.jpg"
    root = shared_dir / TILE / "ground_truth"
    assert find_mask(image, root) == root / "crack" / "exp1_num_249594_mask.png"
    assert find_mask(image.with_name("nope.jpg"), root) is None


def test_calibrate_from_good_images_takes_quantiles(tmp_path, shared_dir):
    good = copy_tiles(shared_dir, tmp_path, {"good": 6})
    (tmp_path / "good" / "corrupt.jpg").write_bytes(b"\xff\xd8 nope")
    model = AnomalyCLIP(tiny_clip(), tiny_config())
    result = calibrate(model, [tmp_path / "good"], progress=False)
    predictions = model.predict(good)
    scores = [p.score for p in predictions]
    maps = np.stack([p.anomaly_map for p in predictions])
    assert result.image_method == "quantile" and result.pixel_method == "quantile"
    assert result.image_threshold == pytest.approx(np.quantile(scores, 0.99), abs=1e-6)
    assert result.pixel_threshold == pytest.approx(np.quantile(maps, 0.999), abs=1e-5)
    assert result.image_threshold <= max(scores) and result.good_score_max == max(scores)
    assert (result.n_good, result.n_anomalous, result.n_masks) == (6, 0, 0)
    assert [s.image for s in result.skipped] == [str(tmp_path / "good" / "corrupt.jpg")]
    assert model.config.image_threshold is None  # calibrate itself changes nothing
    result.apply(model)
    assert model.config.image_threshold == result.image_threshold
    assert model.config.pixel_threshold == result.pixel_threshold


def test_calibrate_with_labels_and_masks_is_f1_optimal(tmp_path, shared_dir):
    good = copy_tiles(shared_dir, tmp_path, {"good": 4})
    cracked = copy_tiles(shared_dir, tmp_path, {"crack": 3})
    masks = {str(p): find_mask(p, shared_dir / TILE / "ground_truth") for p in cracked}
    model = AnomalyCLIP(tiny_clip(), tiny_config())
    result = calibrate(model, good, cracked, masks, progress=False)
    scores = np.array([p.score for p in model.predict([*good, *cracked])])
    labels = np.array([False] * 4 + [True] * 3)
    # the random tiny model's pixel optimum is noise (F1 about 0.03): refused, with the
    # quantile rule used instead and the reason kept (issue 24 item 3)
    assert result.image_method == "f1" and result.pixel_method == "quantile"
    assert result.pixel_f1_refused is not None and "used instead" in result.pixel_f1_refused
    assert (result.n_good, result.n_anomalous, result.n_masks) == (4, 3, 3)
    assert result.image_f1 == pytest.approx(f1_optimal_threshold(scores, labels)[1])
    assert brute_force_f1(scores, labels, result.image_threshold) == pytest.approx(result.image_f1)
    assert 0.0 < result.pixel_f1 < 0.2
    assert 0.0 <= result.pixel_threshold <= len(model.config.features)


def test_calibrate_refuses_bad_settings_and_unreadable_good_sets(tmp_path):
    model = AnomalyCLIP(tiny_clip(), tiny_config())
    with pytest.raises(ValueError, match=r"image_quantile must be in \(0, 1\], got 0"):
        calibrate(model, ["a.png"], image_quantile=0.0)
    with pytest.raises(ValueError, match="at least one known-good image"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="none of the known-good images could be read"):
        calibrate(model, [tmp_path / "missing.png"], progress=False)


def test_cli_calibration_is_saved_and_used_by_predict(tmp_path, shared_dir, caplog):
    files = write_tiny_model(tmp_path / "model")
    good = copy_tiles(shared_dir, tmp_path / "calibration", {"good": 5})
    calibrated = tmp_path / "calibrated.pt"
    summary = tmp_path / "calibration.json"
    code = cli(
        "calibrate",
        tmp_path / "calibration" / "good",
        *model_arguments(files),
        "--image-quantile",
        "0.9",
        "--output",
        calibrated,
        "--summary",
        summary,
        "--no-progress",
    )
    assert code == 0
    checkpoint = read_checkpoint(calibrated)
    details = json.loads(summary.read_text())
    scores = [p.score for p in files[2].predict(good)]
    assert checkpoint.config.image_threshold == pytest.approx(np.quantile(scores, 0.9), abs=1e-6)
    assert checkpoint.config.image_threshold == details["image_threshold"]
    assert checkpoint.config.pixel_threshold == details["pixel_threshold"]
    assert checkpoint.config.image_size == IMAGE_SIZE
    assert checkpoint.extra["calibration"]["n_good"] == 5
    assert checkpoint.extra["calibration"]["calibrated_from"] == str(files[1])

    inputs = copy_tiles(shared_dir, tmp_path / "line", {"good": 3, "crack": 2})
    out = tmp_path / "out"
    clip_path = files[0]
    code = cli(
        "predict",
        tmp_path / "line",
        "--clip-weights",
        clip_path,
        "--checkpoint",
        calibrated,
        "--output-dir",
        out,
        "--no-progress",
    )
    assert code == 0
    run = json.loads((out / "summary.json").read_text())
    assert run["image_threshold"] == checkpoint.config.image_threshold
    assert run["image_threshold_source"] == "calibrated"
    assert run["pixel_threshold"] == checkpoint.config.pixel_threshold
    assert run["pixel_threshold_source"] == "calibrated"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(inputs)
    threshold = checkpoint.config.image_threshold
    assert [r["anomalous"] for r in records] == [r["score"] >= threshold for r in records]
    assert checkpoint.config.extra["calibrated_with"]["image_size"] == IMAGE_SIZE
    assert "do not fit these settings" not in caplog.text

    # Other settings than at calibration: predict warns that the thresholds do not carry over.
    code = cli(
        "predict",
        tmp_path / "line" / "good",
        "--clip-weights",
        clip_path,
        "--checkpoint",
        calibrated,
        "--image-size",
        "32",
        "--output",
        tmp_path / "at32.jsonl",
        "--no-progress",
    )
    assert code == 0
    assert (
        "the calibrated thresholds do not fit these settings (image_size 64 at calibration, "
        "32 now): recalibrate" in caplog.text
    )


def test_cli_calibrate_with_anomalous_folder_and_masks(tmp_path, shared_dir):
    files = write_tiny_model(tmp_path / "model")
    copy_tiles(shared_dir, tmp_path, {"good": 3, "crack": 2})
    output = tmp_path / "calibrated.pt"
    code = cli(
        "calibrate",
        tmp_path / "good",
        "--anomalous",
        tmp_path / "crack",
        "--masks",
        shared_dir / TILE / "ground_truth",
        *model_arguments(files),
        "--output",
        output,
        "--no-progress",
    )
    assert code == 0
    calibration = read_checkpoint(output).extra["calibration"]
    # pixel F1 of the random tiny model is noise: refused for the stated quantile rule
    assert calibration["image_method"] == "f1" and calibration["pixel_method"] == "quantile"
    assert (calibration["n_good"], calibration["n_anomalous"], calibration["n_masks"]) == (3, 2, 2)


def test_cli_calibrate_needs_good_images(tmp_path, caplog):
    files = write_tiny_model(tmp_path / "model")
    listing = tmp_path / "labels.csv"
    listing.write_text("image,label\nd.png,bad\n")
    code = cli("calibrate", "--labels", listing, *model_arguments(files), "--output", "x.pt")
    assert code == 2
    assert "calibrate needs known-good images" in caplog.text
    assert not Path("x.pt").exists()


def test_labels_naming_files_outside_their_folder_are_refused_unless_allowed(tmp_path, caplog):
    """``calibrate --labels`` read ../ and absolute paths (and links out) without asking."""
    folder = tmp_path / "labels"
    folder.mkdir()
    secret = tmp_path / "private" / "x.png"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    (folder / "link.png").symlink_to(secret)
    listing = folder / "labels.csv"
    for row in ("../private/x.png,good,", f"{secret},good,", "link.png,good,", "g.png,1,../m.png"):
        listing.write_text(f"image,label,mask\n{row}\n")
        with pytest.raises(ValueError, match="is outside the folder of the labels file") as error:
            read_labels(listing)
        assert "--allow-outside-paths" in str(error.value) and "not yours" not in str(error.value)
        good, anomalous, _ = read_labels(listing, allow_outside_paths=True)
        assert len(good) + len(anomalous) == 1
    listing.write_text("image,label\n../private/x.png,good\n")
    files = write_tiny_model(tmp_path / "model")
    with caplog.at_level(logging.ERROR):
        code = cli("calibrate", "--labels", listing, *model_arguments(files), "--output", "x.pt")
    assert code == 2 and "'../private/x.png' is outside the folder" in caplog.text
