"""One way to build what is scored, and one loop to score it: the CLI, the service and
Python get the same predictor from the same description, and every workflow scores
through the wrappers (tiles, references) alike."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from anomalyclip import AnomalyCLIP, PredictorSpec, assemble
from anomalyclip.cli import build_parser
from anomalyclip.methods.musc.factory import create_musc
from anomalyclip.methods.references import ReferenceError
from anomalyclip.serving import create_app
from tests.factories import shared_rows, tiny_clip, write_manifest
from tests.helpers import cli, copy_tiles, model_arguments, noise_png, post_image, write_tiny_model


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def line3(shared_dir, tiny_model_files, tmp_path_factory) -> Path:
    """A checkpoint calibrated with four reference images (its bank beside it)."""
    folder = tmp_path_factory.mktemp("line3")
    copy_tiles(shared_dir, folder / "refs", {"good": 4})
    calibrated = folder / "line3.pt"
    arguments = [*model_arguments(tiny_model_files), "--reference", folder / "refs"]
    assert cli("calibrate", *arguments, "--no-progress", "-o", calibrated) == 0
    return calibrated


def test_test_tiles_images_as_predict_does(shared_dir, tiny_model_files, tmp_path):
    """`test --tile-size` scored whole squashed images (the tiles were ignored)."""
    rows = shared_rows(shared_dir, "metal_plate", 2, 2)
    manifest = write_manifest(tmp_path / "plates.csv", rows)
    flags = [*model_arguments(tiny_model_files), "--tile-size", "256", "--no-progress"]
    out = tmp_path / "test"
    code = cli("test", f"csv={manifest}", *flags, "--allow-outside-paths", "--output-dir", out)
    assert code == 0
    (scores_csv,) = out.rglob("scores.csv")
    with scores_csv.open() as handle:
        tested = {Path(row["image"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    images = [row[0] for row in rows]
    jsonl = tmp_path / "predict.jsonl"
    assert cli("predict", *images, *flags, "--output", jsonl) == 0
    predicted = {
        Path(record["image"]).name: record["score"]
        for record in map(json.loads, jsonl.read_text().splitlines())
    }
    assert tested.keys() == predicted.keys() and len(tested) == 4
    for name, score in predicted.items():
        assert tested[name] == pytest.approx(score, abs=1e-5), name
    untiled = tmp_path / "untiled"
    plain = [f for f in flags if f not in ("--tile-size", "256")]
    cli("test", f"csv={manifest}", *plain, "--allow-outside-paths", "--output-dir", untiled)
    (plain_csv,) = untiled.rglob("scores.csv")
    with plain_csv.open() as handle:
        whole = {Path(row["image"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    assert any(abs(whole[n] - tested[n]) > 1e-4 for n in tested)  # tiling changed something


def test_a_reference_calibrated_checkpoint_from_python_is_refused_without_its_bank(
    line3, tiny_model_files
):
    clip_path = tiny_model_files[0]
    with pytest.raises(ReferenceError, match="calibrated with reference images"):
        AnomalyCLIP.from_pretrained(line3, clip_weights=clip_path, image_size=64)


def test_the_assembler_applies_the_bank_for_python_cli_and_service(
    line3, tiny_model_files, tmp_path
):
    clip_path = tiny_model_files[0]
    spec = PredictorSpec(checkpoint=line3, weights=clip_path, overrides={"image_size": 64})
    model = assemble(spec)
    # calibrated from 4 references alone: 2 are the bank, 2 were scored against it
    assert model.settings()["references"]["count"] == 2
    assert model.postprocessor.image_threshold_source == "calibrated"
    parsed = build_parser().parse_args(
        ["serve", "--checkpoint", str(line3), "--clip-weights", str(clip_path)]
        + ["--image-size", "64"]
    )
    from anomalyclip.cli.serve import served_methods

    served = served_methods(parsed)["anomalyclip"]
    with TestClient(create_app(served)) as client:
        answer = post_image(client, noise_png(64, 64)).json()
    expected = model.predict([noise_png(64, 64)])[0]
    assert answer["score"] == pytest.approx(expected.score, abs=1e-5)
    assert answer["anomalous"] == (expected.score >= model.postprocessor.image_threshold)

    moved = tmp_path / "alone.pt"
    shutil.copy(line3, moved)  # the bank not beside it: refused with the CLI's message
    with pytest.raises(ReferenceError, match="their bank .*alone.bank.pt is missing"):
        assemble(PredictorSpec(checkpoint=moved, weights=clip_path, overrides={"image_size": 64}))


def test_musc_scores_a_folder_as_predict_does(shared_dir, tmp_path, caplog):
    """`MuSc.score_set(folder)` took the folder's own files only; predict searches it."""
    source = shared_dir / "datasets" / "metal_plate" / "test"
    folder = tmp_path / "plates"
    for kind in ("good", "defect"):
        (folder / kind).mkdir(parents=True)
        for image in sorted((source / kind).iterdir())[:2]:
            shutil.copy(image, folder / kind / image.name)
    shutil.copy(sorted((source / "good").iterdir())[2], folder / "top.png")
    clip_path = tmp_path / "clip.pt"
    import torch

    torch.save(tiny_clip().state_dict(), clip_path)
    musc = create_musc(clip_path, overrides={"image_size": 64, "features": (2, 4)})
    scored = {Path(p.source).name: p.score for p in musc.score_set(folder)}
    jsonl = tmp_path / "musc.jsonl"
    flags = ["--method", "musc", "--clip-weights", clip_path, "--image-size", "64"]
    with caplog.at_level(logging.INFO):
        code = cli("predict", folder, *flags, "--features", "2", "4", "--output", jsonl)
    assert code == 0
    predicted = {
        Path(r["image"]).name: r["score"] for r in map(json.loads, jsonl.read_text().splitlines())
    }
    assert len(scored) == 5 and scored.keys() == predicted.keys()
    assert np.allclose([scored[n] for n in sorted(scored)], [predicted[n] for n in sorted(scored)])
