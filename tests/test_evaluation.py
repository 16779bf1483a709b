"""Evaluation: per-class metrics equal the metric functions on the model's own outputs;
undefined metrics stay undefined; the CLI writes complete tables for the shared datasets."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip.backbone.loading import load_clip
from anomalyclip.cli import main
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.evaluation import metrics
from anomalyclip.evaluation.evaluate import METRICS, class_metrics, evaluate, load_masks
from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from tests.factories import tiny_clip

TINY = dict(
    image_size=32, features=(2, 4), dpam_layers=3, prompt_depth=2, n_ctx=4, deep_prompt_length=2
)


def tiny_model(**overrides) -> AnomalyCLIP:
    torch.manual_seed(111)
    return AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> AnomalyDataset:
    """Class "alpha": 3 normal, 3 anomalous with masks; class "beta": normal images only."""
    root = tmp_path_factory.mktemp("synthetic")
    generator = np.random.default_rng(7)
    samples = []
    for category, anomalous in (("alpha", 3), ("beta", 0)):
        for index in range(3 + anomalous):
            label = int(index >= 3)
            image = root / f"{category}_{index}.png"
            pixels = generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image)
            mask = None
            if label:
                mask = root / f"{category}_{index}_mask.png"
                marked = np.zeros((40, 48), dtype=np.uint8)
                marked[5 + index : 20 + index, 10:30] = 255
                Image.fromarray(marked).save(mask)
            defect = "scratch" if label else "good"
            samples.append(Sample(image, label, mask, category, defect))
    return AnomalyDataset.create("synthetic", root, "test", samples, pixel_level=True)


def test_class_metrics_are_the_metric_functions_and_nan_where_undefined():
    generator = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 1])
    scores = generator.random(5)
    masks = np.zeros((5, 16, 16), dtype=bool)
    masks[2:, 4:9, 4:9] = True
    maps = generator.random((5, 16, 16)).astype(np.float32) + masks
    values = class_metrics(labels, scores, masks, maps)
    assert values["image_auroc"] == metrics.image_auroc(labels, scores)
    assert values["image_ap"] == metrics.image_ap(labels, scores)
    assert values["image_f1_max"] == metrics.image_f1_max(labels, scores)
    assert values["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
    assert values["pixel_aupro"] == metrics.aupro(masks, maps)
    assert values["pixel_ap"] == metrics.pixel_ap(masks, maps)
    assert values["pixel_f1_max"] == metrics.pixel_f1_max(masks, maps)
    exact = class_metrics(labels, scores, masks, maps, aupro_method="exact")
    assert exact["pixel_aupro"] == metrics.aupro(masks, maps, method="exact")

    image_only = class_metrics(labels, scores, None, None)
    assert all(math.isnan(image_only[m]) for m in METRICS if m.startswith("pixel"))
    one_class = class_metrics(np.zeros(5, int), scores, np.zeros_like(masks), maps)
    assert all(math.isnan(v) for v in one_class.values())


def test_evaluate_equals_metrics_on_the_models_predictions(synthetic, tmp_path):
    model = tiny_model()
    result = evaluate(model, synthetic, batch_size=4, progress=False)
    assert [c.category for c in result.classes] == ["alpha", "beta"]
    assert [(c.normal, c.anomalous) for c in result.classes] == [(3, 3), (3, 0)]

    alpha = [s for s in synthetic if s.category == "alpha"]
    predictions = model.predict([s.image for s in alpha], batch_size=2)
    scores = np.array([p.score for p in predictions])
    maps = np.stack([p.anomaly_map for p in predictions])
    masks = load_masks(alpha, model.preprocessor)
    assert masks.shape == (6, 32, 32) and masks[3:].any() and not masks[:3].any()
    expected = class_metrics(np.array([s.label for s in alpha]), scores, masks, maps)
    for name in METRICS:
        assert result.classes[0].metrics[name] == pytest.approx(expected[name], abs=1e-6), name

    beta = result.classes[1].metrics
    assert all(math.isnan(beta[m]) for m in METRICS)
    mean = result.rows()[-1]
    assert (mean.category, mean.normal, mean.anomalous) == ("mean", 6, 3)
    assert mean.metrics == pytest.approx(result.classes[0].metrics)

    paths = result.write(tmp_path)
    markdown = paths["markdown"].read_text()
    assert "| beta | 3 | 0 | - | - | - | - | - | - | - |" in markdown
    alpha_auroc = f"{100 * result.classes[0].metrics['image_auroc']:.1f}"
    assert f"| alpha | 3 | 3 | {alpha_auroc} |" in markdown
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["category"] for r in rows] == ["alpha", "beta", "mean"]
    assert rows[1]["pixel_aupro"] == "" and float(rows[0]["pixel_aupro"]) == pytest.approx(
        result.classes[0].metrics["pixel_aupro"]
    )
    data = json.loads(paths["json"].read_text())
    assert data["classes"][1]["image_auroc"] is None
    assert data["mean"]["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-6)
    assert data["settings"]["config"]["image_size"] == 32


def test_evaluate_saves_maps_and_overlays(synthetic, tmp_path):
    model = tiny_model()
    evaluate(model, synthetic, batch_size=8, maps_dir=tmp_path, progress=False)
    sample = synthetic[4]
    saved = np.load(tmp_path / "maps" / "alpha" / "scratch" / f"{sample.image.stem}.npy")
    expected = model.predict([sample.image])[0].anomaly_map
    assert saved.shape == (32, 32) and saved.dtype == np.float32
    np.testing.assert_allclose(saved, expected, atol=1e-6)
    overlay = Image.open(tmp_path / "overlays" / "alpha" / "scratch" / f"{sample.image.stem}.png")
    assert overlay.size == (48, 40)
    assert len(list((tmp_path / "maps").rglob("*.npy"))) == len(synthetic)


def test_object_aware_evaluation_prompts_each_class_by_name(synthetic):
    model = tiny_model(prompt_mode="aware")
    asked = []
    original = model.text_features

    def recording(object_name=None):
        asked.append(object_name)
        return original(object_name)

    model.text_features = recording
    evaluate(model, synthetic, progress=False)
    assert asked == ["alpha", "beta"]
    aware = model.compute_text_features("alpha")
    assert not torch.allclose(aware, model.compute_text_features("beta"))


def test_cli_test_writes_every_metric_for_every_class(shared_dir, tmp_path, capsys):
    clip_file = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip().state_dict(), clip_file)
    clip = load_clip(clip_file)
    model = AnomalyCLIP(clip, AnomalyCLIPConfig(backbone=str(clip_file), **TINY))
    checkpoint = save_checkpoint(tmp_path / "prompts.pt", model)
    datasets = shared_dir / "datasets"
    code = main(
        [
            "test",
            str(datasets / "glass"),
            str(datasets / "metal_plate"),
            str(datasets / "headct"),
            "--checkpoint",
            str(checkpoint),
            "--clip-weights",
            str(clip_file),
            "--batch-size",
            "16",
            "--no-progress",
            "-o",
            str(tmp_path / "results"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "**glass**" in printed and "**mean over classes**" in printed
    for name, pixel_level in (("glass", True), ("metal_plate", True), ("headct", False)):
        data = json.loads((tmp_path / "results" / name / "results.json").read_text())
        assert data["settings"]["config"]["features"] == [2, 4]
        for row in data["classes"]:
            assert row["normal"] > 0 and row["anomalous"] > 0
            for metric in METRICS:
                value = row[metric]
                if metric.startswith("pixel") and not pixel_level:
                    assert value is None, (name, metric)
                else:
                    assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, metric)
        assert (tmp_path / "results" / name / "results.csv").is_file()
        assert (tmp_path / "results" / name / "results.md").is_file()
    with (tmp_path / "results" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [r["dataset"] for r in summary] == ["glass", "metal_plate", "headct"]
    assert summary[2]["pixel_auroc"] == "" and float(summary[1]["pixel_auroc"]) > 0


def test_cli_test_refuses_two_datasets_with_one_name(shared_dir, tmp_path, caplog):
    glass = shared_dir / "datasets" / "glass"
    assert main(["test", str(glass), f"mvtec={glass}", "-o", str(tmp_path)]) == 2
    assert "several datasets would be written to the same folder (glass)" in caplog.text


def test_anomalous_images_with_empty_masks_are_named(shared_dir, tmp_path, caplog):
    """Issue 24: ``test`` accepted anomalous images whose masks mark nothing, without a
    word; their pixels then counted as normal."""
    import logging

    from PIL import Image

    from anomalyclip.data.core import Sample
    from anomalyclip.evaluation.evaluate import load_masks, say_empty_masks
    from anomalyclip.preprocess import PreProcessor

    plates = shared_dir / "datasets" / "metal_plate"
    defects = sorted((plates / "test" / "defect").iterdir())[:3]
    masks = [plates / "ground_truth" / "defect" / f"{p.stem}_mask.png" for p in defects]
    black = tmp_path / "black_mask.png"
    Image.new("L", Image.open(masks[0]).size).save(black)
    samples = [
        Sample(defects[0], 1, masks[0]),
        Sample(defects[1], 1, black),
        Sample(defects[2], 1, masks[2]),
    ]
    loaded = load_masks(samples, PreProcessor(64))
    with caplog.at_level(logging.WARNING):
        assert say_empty_masks("metal_plate", samples, loaded) == 1
    assert (
        f"metal_plate: 1 of 3 anomalous images have an empty mask ({defects[1]}); their pixels "
        "count as normal in the pixel metrics: check the masks" in caplog.text
    )
    caplog.clear()
    assert say_empty_masks("metal_plate", samples[::2], loaded[::2]) == 0
    assert caplog.text == ""
