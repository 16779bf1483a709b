"""MuSc covers the whole image where the paper's centre crop would lose part of it, and
says so; asked for the crop, it marks what was not scored (issue 24, item 6)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from anomalyclip.inspection.run import inspect
from anomalyclip.methods.musc.model import MuSc, MuScConfig
from tests.factories import tiny_clip


def wide_parts(shared_dir, count: int = 3) -> list[Image.Image]:
    """1536 x 512 parts: three real metal plates side by side (a 3:1 part)."""
    plates = sorted((shared_dir / "datasets" / "metal_plate" / "test" / "good").iterdir())
    parts = []
    for index in range(count):
        part = Image.new("RGB", (1536, 512))
        for slot in range(3):
            part.paste(Image.open(plates[3 * index + slot]).convert("RGB"), (512 * slot, 0))
        parts.append(part)
    return parts


def musc(coverage: str) -> MuSc:
    config = MuScConfig(backbone="tiny", image_size=32, features=(2, 4), coverage=coverage)
    return MuSc(tiny_clip(), config)


def test_wide_parts_are_scored_whole_by_default_and_said(shared_dir, caplog):
    parts = wide_parts(shared_dir)
    with caplog.at_level(logging.WARNING):
        predictions = musc("auto").predict_images(parts)
    assert "3 of 3 images are not square; the paper's centre crop would leave up to 67 %" in (
        caplog.text
    )
    placed = predictions[0].map_at_original_size()
    assert predictions[0].preprocessor.resize == "squash"
    # the outer plates are scored: the map varies there, not a constant fill
    assert placed[:, :512].std() > 0 and placed[:, -512:].std() > 0
    # square images keep the paper's crop, which loses nothing on them
    squares = [part.crop((0, 0, 512, 512)) for part in parts]
    assert musc("auto").predict_images(squares)[0].preprocessor.resize == "center-crop"


def test_the_papers_crop_marks_what_it_did_not_score(shared_dir, tmp_path, caplog):
    parts = wide_parts(shared_dir)
    sources = []
    for index, part in enumerate(parts):
        sources.append(tmp_path / f"part_{index}.png")
        part.save(sources[-1])
    with caplog.at_level(logging.WARNING):
        summary = inspect(sources, musc("center-crop"), tmp_path / "run", progress=False)
    assert "up to 67 % of each lies outside the centre square, is not scored" in caplog.text
    shown = np.asarray(Image.open(tmp_path / "run" / summary.results[0].overlay).convert("RGB"))
    original = np.asarray(parts[0].convert("L"))
    # outside the centre square: the original in grey, no heat colour
    left = shown[:, :500].astype(int)
    assert np.abs(left[..., 0] - left[..., 2]).max() <= 1
    assert np.abs(left[..., 0] - original[:, :500].astype(int)).max() <= 1
    # inside: coloured
    centre = shown[:, 600:900].astype(int)
    assert np.abs(centre[..., 0] - centre[..., 2]).mean() > 5
    # the record and the report say it too (issue 24, item 6c)
    assert summary.results[0].scored_share == pytest.approx(1 / 3)
    first = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0]
    assert json.loads(first)["scored_share"] == pytest.approx(1 / 3)
    report = (tmp_path / "run" / "report.html").read_text()
    assert "scored 33% of the image (centre square; the grey strips were not scored)" in report
    assert "3 images: only their centre square was scored" in report


def test_an_unknown_coverage_is_refused():
    with pytest.raises(ValueError, match="coverage must be one of auto, center-crop, whole"):
        MuScConfig(coverage="sides")


def test_musc_with_references_covers_wide_parts_whole_and_keeps_it_in_the_bank(
    shared_dir, tmp_path, caplog
):
    """The reference mode scored the centre square of wide parts only (issue 24, item 6a):
    its bank and the images are now fitted whole where the crop would lose part."""
    from anomalyclip.methods.musc.few_shot import MuScWithReferences

    parts = wide_parts(shared_dir, 4)
    with caplog.at_level(logging.WARNING):
        scorer = MuScWithReferences.from_images(musc("auto"), parts[:3])
    assert "3 of 3 images are not square" in caplog.text
    assert scorer.settings()["references"]["resize"] == "squash"
    (prediction,) = scorer.predict_images([parts[3]])
    assert prediction.preprocessor.resize == "squash"
    placed = prediction.map_at_original_size()
    assert placed[:, :512].std() > 0 and placed[:, -512:].std() > 0
    # a saved bank keeps how its references were fitted
    loaded = MuScWithReferences.load(musc("auto"), scorer.save(tmp_path / "bank.pt"))
    assert loaded.preprocessor.resize == "squash"
    assert loaded.predict_images([parts[3]])[0].score == pytest.approx(prediction.score)


def test_musc_with_square_references_says_what_a_wide_image_loses(shared_dir, caplog):
    from anomalyclip.methods.musc.few_shot import MuScWithReferences

    parts = wide_parts(shared_dir, 3)
    squares = [part.crop((0, 0, 512, 512)) for part in parts[:2]]
    scorer = MuScWithReferences.from_images(musc("auto"), squares)
    with caplog.at_level(logging.WARNING):
        (prediction,) = scorer.predict_images([parts[2]])
    assert prediction.preprocessor.resize == "center-crop"
    assert "2 of 2" not in caplog.text
    assert "1 of 1 images are not square, up to 67 % of each lies outside the centre" in (
        caplog.text
    )
