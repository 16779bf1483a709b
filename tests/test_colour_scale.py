"""Overlay colours scaled to what the scores mean (issue 24, item 5): MuSc's raw
distances coloured over its fixed 0-2 range were uniform blue even at image AUROC
0.985; a person could not find the defect in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomalyclip.visualize import colour_scale


def test_the_scale_follows_the_threshold_or_the_runs_robust_range():
    maps = [np.linspace(0.30, 0.50, 1000, dtype=np.float32).reshape(10, 100)]
    robust = colour_scale((0.0, 2.0), None, maps)
    assert (robust.low, robust.high) == pytest.approx(
        (float(np.percentile(maps[0], 1)), float(np.percentile(maps[0], 99.9)))
    )
    assert robust.source.startswith("robust range of this run's first 1 images")
    calibrated = colour_scale((0.0, 2.0), 0.42, maps)
    assert (calibrated.low, calibrated.high) == pytest.approx((0.0, 0.84))
    probabilities = [np.linspace(0.0, 0.9, 1000, dtype=np.float32)]
    fixed = colour_scale((0.0, 1.0), None, probabilities)  # maps fill their range: kept
    assert (fixed.low, fixed.high, fixed.source) == (0.0, 1.0, "the method's map range")


@pytest.mark.slow
def test_musc_with_references_overlays_show_the_defect(shared_dir, reference_dir, tmp_path):
    from anomalyclip import PredictorSpec, assemble
    from anomalyclip.inspection.run import inspect

    plates = shared_dir / "datasets" / "metal_plate"
    good = sorted((plates / "test" / "good").iterdir())
    defect = sorted((plates / "test" / "defect").iterdir())[0]
    model = assemble(
        PredictorSpec(
            method="musc",
            weights=reference_dir / "clip_openai_layout.pt",
            references=[str(p) for p in good[-4:]],
        )
    )
    out = tmp_path / "run"
    summary = inspect([defect, good[0]], model, out, progress=False)
    mask = np.asarray(Image.open(plates / "ground_truth" / "defect" / f"{defect.stem}_mask.png"))
    mask = mask.reshape(mask.shape[0], mask.shape[1], -1)[..., 0] > 0
    (record,) = [r for r in summary.results if r.image == str(defect)]
    shown = np.asarray(Image.open(out / record.overlay).convert("RGB"), dtype=np.float64)
    original = np.asarray(Image.open(defect).convert("RGB"), dtype=np.float64)
    heat = shown - 0.5 * original  # the colour the map added (alpha 0.5)
    inside, outside = heat[mask].mean(axis=0), heat[~mask].mean(axis=0)
    # warm at the defect, cool elsewhere: jet's red against blue
    assert inside[0] - outside[0] > 30
    assert outside[2] - inside[2] > 10
    written = json.loads((out / "summary.json").read_text())
    low, high = written["colour_scale"]
    assert 0 < low < high < 1.0  # the run's range, not MuSc's fixed 0-2
    assert written["colour_scale_source"].startswith("robust range of this run's first 2")
    report = (out / "report.html").read_text()
    assert f"map {low:.4g}" in report and "colour scale: robust range" in report
