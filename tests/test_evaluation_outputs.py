"""What ``anomalyclip test`` writes besides the paper's table (issue 12, items 9 and 15):
unreadable images and masks are skipped and listed, metrics are those of the rest, and
per-image scores, defect-type rows, a pooled row and verdicts at the model's threshold
are written, equal to the metric functions on the same scores."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip.backbone.loading import load_clip
from anomalyclip.cli import main
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.evaluation.evaluate import METRICS, class_metrics, evaluate, load_masks
from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import PreProcessor
from tests.factories import tiny_clip

TINY = dict(
    image_size=32, features=(2, 4), dpam_layers=3, prompt_depth=2, n_ctx=4, deep_prompt_length=2
)


def tiny_model(**overrides) -> AnomalyCLIP:
    torch.manual_seed(111)
    return AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**TINY, **overrides})).eval()


def make_samples(root: Path) -> list[Sample]:
    """Class "alpha": 4 normal, 3 "scratch" and 3 "dent" with masks; class "beta": 3
    normal, 2 "scratch"."""
    generator = np.random.default_rng(5)
    samples = []
    layout = {
        "alpha": ["good"] * 4 + ["scratch", "dent"] * 3,
        "beta": ["good"] * 3 + ["scratch"] * 2,
    }
    for category, defects in layout.items():
        for index, defect in enumerate(defects):
            label = int(defect != "good")
            image = root / f"{category}_{index}.png"
            Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
            mask = None
            if label:
                mask = root / f"{category}_{index}_mask.png"
                marked = np.zeros((40, 48), dtype=np.uint8)
                marked[4 + index : 18 + index, 8 + index : 30] = 255
                Image.fromarray(marked).save(mask)
            samples.append(Sample(image, label, mask, category, defect))
    return samples


def dataset_of(root: Path, samples: list[Sample]) -> AnomalyDataset:
    return AnomalyDataset.create("synthetic", root, "test", samples, pixel_level=True)


def test_unreadable_images_and_masks_are_skipped_and_the_rest_evaluated(tmp_path, caplog):
    samples = make_samples(tmp_path)
    broken_image, broken_mask = samples[1], samples[5]  # a normal image; a scratch's mask
    broken_image.image.write_bytes(broken_image.image.read_bytes()[:60])  # truncated
    assert broken_mask.mask is not None
    broken_mask.mask.write_bytes(b"not a png")
    model = tiny_model()
    with caplog.at_level(logging.WARNING):
        result = evaluate(model, dataset_of(tmp_path, samples), batch_size=3, progress=False)
    assert f"skipping cannot read image {broken_image.image}" in caplog.text
    assert f"skipping {broken_mask.image}: its mask is unusable" in caplog.text
    skipped = result.details.skipped
    assert [(s.image, s.category) for s in skipped] == [
        (str(broken_image.image), "alpha"),
        (str(broken_mask.image), "alpha"),
    ]
    assert "truncated" in skipped[0].reason and str(broken_mask.mask) in skipped[1].reason

    # the metrics are those of the other images, scored on their own
    rest = [s for s in samples if s not in (broken_image, broken_mask)]
    alpha = [s for s in rest if s.category == "alpha"]
    predictions = model.predict([s.image for s in alpha])
    scores = np.array([p.score for p in predictions])
    maps = np.stack([p.anomaly_map for p in predictions])
    expected = class_metrics(
        np.array([s.label for s in alpha]), scores, load_masks(alpha, model.preprocessor), maps
    )
    row = result.classes[0]
    assert (row.category, row.normal, row.anomalous) == ("alpha", 3, 5)
    for name in METRICS:
        assert row.metrics[name] == pytest.approx(expected[name], abs=1e-6), name

    paths = result.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["skipped_count"] == 2 and data["evaluated"] == len(rest)
    assert data["skipped"][0] == {
        "image": str(broken_image.image),
        "class": "alpha",
        "reason": skipped[0].reason,
    }
    markdown = paths["markdown"].read_text()
    assert "2 images skipped (not in any metric):" in markdown
    assert f"- {broken_mask.image}: mask {broken_mask.mask}" in markdown
    with paths["csv"].open() as handle:  # the table itself keeps its rows and columns
        assert [r["category"] for r in csv.DictReader(handle)] == ["alpha", "beta", "mean"]
    with paths["scores"].open() as handle:
        images = [r["image"] for r in csv.DictReader(handle)]
    assert images == [str(s.image) for s in rest]


class SetScorer(Predictor):
    """A method whose images score each other (as MuSc's do): each image's score is its
    distance from the set's mean image, so a skipped image would change every score."""

    method = "set-scorer"
    scores_sets = True

    def __init__(self) -> None:
        self.calls: list[int] = []

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(16)

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor()

    def settings(self) -> dict:
        return {}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(images))
        distance = (images - images.mean(0, keepdim=True)).abs().mean(1)
        return distance.flatten(1).mean(1).numpy(), distance.numpy().astype(np.float32)


def test_a_set_method_scores_the_readable_images_of_a_class_as_one_set(tmp_path, caplog):
    samples = make_samples(tmp_path)
    samples[6].image.write_bytes(b"\x89PNG broken")
    model = SetScorer()
    with caplog.at_level(logging.WARNING):
        result = evaluate(model, dataset_of(tmp_path, samples), batch_size=2, progress=False)
    assert model.calls == [9, 5]  # alpha's 10 images less the broken one, then beta's 5
    assert f"skipping cannot read image {samples[6].image}" in caplog.text
    assert [s.image for s in result.details.skipped] == [str(samples[6].image)]
    alpha = [s for i, s in enumerate(samples) if s.category == "alpha" and i != 6]
    scores, _ = SetScorer().score_tensors(model.preprocessor([s.image for s in alpha]))
    got = [i.score for i in result.details.images if i.category == "alpha"]
    assert got == pytest.approx(scores.tolist(), abs=1e-6)


def test_defect_rows_pooled_row_and_verdicts_at_the_threshold(tmp_path):
    samples = make_samples(tmp_path)
    model = tiny_model(image_threshold=0.5)
    scores_of = {
        p.source: (p.score, float(p.anomaly_map.max()))
        for p in model.predict([s.image for s in samples])
    }
    # a threshold between the scores, so that both kinds of error can occur
    threshold = float(np.median([score for score, _ in scores_of.values()]))
    model = tiny_model(image_threshold=threshold)
    result = evaluate(model, dataset_of(tmp_path, samples), batch_size=4, progress=False)
    details = result.details
    # per-image scores
    assert [(i.image, i.category, i.defect, i.label) for i in details.images] == [
        (str(s.image), s.category, s.defect, s.label) for s in samples
    ]
    for image in details.images:
        score, peak = scores_of[image.image]
        assert image.score == pytest.approx(score, abs=1e-6)
        assert image.map_max == pytest.approx(peak, abs=1e-6)

    # defect rows: that type's images against the class's normal ones; pixels of its own
    predictions = {p.source: p for p in model.predict([s.image for s in samples])}
    assert [(d.category, d.defect, d.normal, d.anomalous) for d in details.defects] == [
        ("alpha", "scratch", 4, 3),
        ("alpha", "dent", 4, 3),
        ("beta", "scratch", 3, 2),
    ]
    for row in details.defects:
        group = [
            s for s in samples if s.category == row.category and s.defect in ("good", row.defect)
        ]
        own = [s for s in group if s.label]
        expected = class_metrics(
            np.array([s.label for s in group]),
            np.array([predictions[str(s.image)].score for s in group]),
            load_masks(own, model.preprocessor),
            np.stack([predictions[str(s.image)].anomaly_map for s in own]),
        )
        for name in METRICS:
            assert row.metrics[name] == pytest.approx(expected[name], abs=1e-6, nan_ok=True)

    # the pooled row: every image of every class together
    pooled = details.pooled
    assert pooled is not None and (pooled.normal, pooled.anomalous) == (7, 8)
    expected = class_metrics(
        np.array([s.label for s in samples]),
        np.array([predictions[str(s.image)].score for s in samples]),
        load_masks(samples, model.preprocessor),
        np.stack([predictions[str(s.image)].anomaly_map for s in samples]),
    )
    for name in METRICS:
        assert pooled.metrics[name] == pytest.approx(expected[name], abs=1e-6), name

    # verdicts at the threshold: false alarms are normal images flagged, escapes missed ones
    rows = {row.category: row for row in details.at_threshold()}
    assert list(rows) == ["alpha", "beta", "pooled"]
    for category, row in rows.items():
        group = [s for s in samples if category in ("pooled", s.category)]
        flagged = [predictions[str(s.image)].score >= threshold for s in group]
        alarms = sum(f and not s.label for s, f in zip(group, flagged, strict=True))
        escapes = sum(s.label and not f for s, f in zip(group, flagged, strict=True))
        caught = sum(s.label for s in group) - escapes
        assert (row.false_alarms, row.escapes) == (alarms, escapes), category
        assert row.false_alarm_rate == pytest.approx(alarms / row.normal)
        assert row.escape_rate == pytest.approx(escapes / row.anomalous)
        assert row.recall == pytest.approx(caught / row.anomalous)
        if caught + alarms:
            assert row.precision == pytest.approx(caught / (caught + alarms))
        assert row.f1 == pytest.approx(2 * caught / (2 * caught + alarms + escapes))
    assert sum(r.false_alarms + r.escapes for c, r in rows.items() if c != "pooled") > 0

    paths = result.write(tmp_path / "out")
    with paths["breakdown_csv"].open() as handle:
        breakdown = list(csv.DictReader(handle))
    assert [(r["category"], r["defect"]) for r in breakdown] == [
        ("alpha", "scratch"),
        ("alpha", "dent"),
        ("beta", "scratch"),
        ("pooled", "all"),
    ]
    assert float(breakdown[3]["image_auroc"]) == pytest.approx(pooled.metrics["image_auroc"])
    assert "| alpha / dent | 4 | 3 |" in paths["breakdown_markdown"].read_text()
    with paths["threshold_csv"].open() as handle:
        verdicts = list(csv.DictReader(handle))
    assert int(verdicts[2]["false_alarms"]) == rows["pooled"].false_alarms
    assert (
        f"at image threshold {threshold:.6g} (calibrated)"
        in paths["threshold_markdown"].read_text()
    )
    data = json.loads(paths["json"].read_text())
    assert data["image_threshold"] == pytest.approx(threshold)
    assert data["pooled"]["normal"] == 7 and len(data["defects"]) == 3

    # without a threshold there are no verdicts and no threshold files
    plain = evaluate(tiny_model(), dataset_of(tmp_path, samples), progress=False)
    assert plain.details.at_threshold() == []
    assert "threshold_csv" not in plain.write(tmp_path / "plain")


def small_glass(shared_dir: Path, root: Path) -> Path:
    """A copy of the shared glass set: 4 normal images and 3 of each defect type."""
    source = shared_dir / "datasets" / "glass"
    for folder in ("test/good", "test/edge", "test/angle"):
        (root / folder).mkdir(parents=True)
        for image in sorted((source / folder).glob("*.png"))[: 4 if "good" in folder else 3]:
            shutil.copy(image, root / folder / image.name)
            if "good" not in folder:
                mask = source / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
                (root / "ground_truth" / image.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, root / "ground_truth" / image.parent.name / mask.name)
    return root


def test_cli_test_skips_damaged_files_and_writes_scores_breakdown_and_verdicts(
    shared_dir, tmp_path, capsys, caplog
):
    glass = small_glass(shared_dir, tmp_path / "glass")
    truncated = sorted((glass / "test" / "edge").glob("*.png"))[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    damaged_mask = sorted((glass / "ground_truth" / "angle").glob("*.png"))[0]
    damaged_mask.write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    clip_file = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip().state_dict(), clip_file)
    config = AnomalyCLIPConfig(backbone=str(clip_file), image_threshold=0.45, **TINY)
    checkpoint = save_checkpoint(tmp_path / "prompts.pt", AnomalyCLIP(load_clip(clip_file), config))
    out = tmp_path / "results"
    arguments = ["test", str(glass), "--checkpoint", str(checkpoint), "--clip-weights"]
    arguments += [str(clip_file), "--batch-size", "4", "--no-progress", "-o", str(out)]
    with caplog.at_level(logging.WARNING):
        assert main(arguments) == 0
    assert f"skipping cannot read image {truncated}" in caplog.text
    assert str(damaged_mask) in caplog.text
    assert "glass: 2 images skipped, metrics computed on the other 8" in caplog.text
    assert "2 images skipped (not in any metric):" in capsys.readouterr().out

    data = json.loads((out / "glass" / "results.json").read_text())
    assert data["skipped_count"] == 2
    assert {Path(s["image"]).name for s in data["skipped"]} == {truncated.name, "000.png"}
    assert (data["classes"][0]["normal"], data["classes"][0]["anomalous"]) == (4, 4)
    assert all(isinstance(data["classes"][0][m], float) for m in METRICS)
    with (out / "glass" / "scores.csv").open() as handle:
        scores = list(csv.DictReader(handle))
    assert list(scores[0]) == ["image", "class", "defect", "label", "score", "map_max"]
    assert len(scores) == 8 and {r["defect"] for r in scores} == {"good", "edge", "angle"}
    assert all(0 <= float(r["score"]) <= 1 and float(r["map_max"]) >= 0 for r in scores)
    with (out / "glass" / "breakdown.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["defect"] for r in rows) == ["all", "angle", "edge"]
    assert {(r["defect"], r["anomalous"]) for r in rows} >= {("edge", "2"), ("angle", "2")}
    assert all(r["pixel_auroc"] for r in rows)
    verdicts = (out / "glass" / "threshold.md").read_text()
    assert "at image threshold 0.45 (calibrated)" in verdicts and "| pooled | 4 |" in verdicts


@pytest.mark.slow
def test_torchrun_skips_the_same_images_and_writes_the_same_files(shared_dir, clip_file, tmp_path):
    """A truncated image in a batch of rank 1 and a damaged mask: two processes skip the
    same images and write the same tables, scores and breakdown as one process."""
    from tests.factories import shared_rows, write_manifest
    from tests.helpers import TORCHRUN_FLAGS, torchrun

    rows = shared_rows(shared_dir, "glass", 4, 3) + shared_rows(shared_dir, "metal_plate", 3, 4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(rows[4][0]).read_bytes()[:500])
    bad_mask = tmp_path / "bad_mask.png"
    bad_mask.write_bytes(b"no mask here")
    rows[4] = (broken, rows[4][1], rows[4][2], rows[4][3])
    rows[9] = (rows[9][0], 1, bad_mask, rows[9][3])
    manifest = write_manifest(tmp_path / "test.csv", rows)
    common = [f"csv={manifest}", "--clip-weights", str(clip_file), *TORCHRUN_FLAGS]
    common += ["--checkpoint", "none", "--batch-size", "3"]

    assert main(["test", *common, "-o", str(tmp_path / "single")]) == 0
    torchrun(["test", *common, "-o", str(tmp_path / "split")], tmp_path)
    single, split = tmp_path / "single" / "test", tmp_path / "split" / "test"
    one = json.loads((single / "results.json").read_text())
    two = json.loads((split / "results.json").read_text())
    assert one["skipped_count"] == 2
    for key in ("classes", "mean", "skipped", "pooled", "defects"):
        assert two[key] == one[key], key
    for name in ("breakdown.csv", "results.md"):
        assert (split / name).read_text() == (single / name).read_text(), name
    # image scores agree to float32 rounding only: the processes run with another thread
    # count than this one (OMP_NUM_THREADS=1), which rounds the score head differently
    # whether or not images are skipped; the metrics above are equal all the same
    with (single / "scores.csv").open() as a, (split / "scores.csv").open() as b:
        want, got = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(got) == len(want) == len(rows) - 2
    for w, g in zip(want, got, strict=True):
        assert [g[k] for k in ("image", "class", "defect", "label", "map_max")] == [
            w[k] for k in ("image", "class", "defect", "label", "map_max")
        ]
        assert float(g["score"]) == pytest.approx(float(w["score"]), rel=1e-6)
