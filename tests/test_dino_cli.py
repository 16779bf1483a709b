"""AnomalyDINO and MuSc on DINOv2 through the command line: the authors' vectors
(``../shared/reference/anomalydino`` and ``musc_dinov2``) reproduced by ``anomalyclip
predict`` with its flags, image scores and the ``--save-maps`` maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cli

TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}  # the references' README


@pytest.fixture(scope="module")
def dino(shared_dir: Path) -> tuple[Path, dict, dict]:
    folder = shared_dir / "reference" / "anomalydino"
    expected = dict(np.load(folder / "expected.npz"))
    return folder, json.loads((folder / "expected.json").read_text()), expected


def run_predict(tmp_path: Path, images: list[Path], *flags: object) -> tuple[np.ndarray, Path]:
    out, maps = tmp_path / "out.jsonl", tmp_path / "maps"
    code = cli("predict", *images, *flags, "--output", out, "--save-maps", maps, "--no-progress")
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == [p.name for p in images]
    return np.array([r["score"] for r in records]), maps


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "flags"),
    [("shot1", ()), ("shot4_mask", ("--masking", "--rotation", "--neighbours", "1"))],
)
def test_anomalydino_few_shot_through_the_cli(dino, shared_dir, tmp_path, case, flags):
    folder, meta, expected = dino
    datasets = shared_dir / "datasets"
    images = [datasets / p for p in meta["images"]]
    references = [datasets / p for p in meta["cases"][case]["references"]]
    weights = folder / "dinov2_small_random.pth"
    scores, maps = run_predict(
        tmp_path,
        images,
        *("--method", "anomalydino", "--backbone", weights, "--reference", *references),
        *flags,
    )
    np.testing.assert_allclose(scores, expected[f"{case}.image_score"], **TOLERANCE)
    for index in (0, 4):
        saved = np.load(maps / f"{images[index].stem}.npy")
        reference = expected[f"{case}.anomaly_map.{index}"]
        assert saved.shape == reference.shape == (512, 512)  # the original image's size
        np.testing.assert_allclose(saved, reference, **TOLERANCE)


@pytest.mark.slow
def test_anomalydino_batched_zero_shot_through_the_cli(dino, shared_dir, tmp_path):
    folder, meta, expected = dino
    images = [shared_dir / "datasets" / p for p in meta["images"]]
    weights = folder / "dinov2_small_random.pth"
    scores, _ = run_predict(tmp_path, images, "--method", "anomalydino", "--backbone", weights)
    np.testing.assert_allclose(scores, expected["batched.image_score"], **TOLERANCE)


@pytest.mark.slow
def test_musc_on_dinov2_through_the_cli(shared_dir, tmp_path):
    folder = shared_dir / "reference" / "musc_dinov2"
    meta = json.loads((folder / "expected.json").read_text())
    expected = np.load(folder / "expected.npz")
    images = [shared_dir / "datasets" / p for p in meta["images"]]
    weights = shared_dir / "reference" / "anomalydino" / "dinov2_small_random.pth"
    scores, maps = run_predict(
        tmp_path,
        images,
        *("--method", "musc", "--backbone", weights, "--image-size", "518"),
        *("--features", "3", "6", "9", "12"),
    )
    np.testing.assert_allclose(scores, expected["image_score"], **TOLERANCE)
    saved = np.stack([np.load(maps / f"{p.stem}.npy") for p in images])
    np.testing.assert_allclose(saved, expected["anomaly_map"], **TOLERANCE)


def test_options_of_another_method_are_refused(tmp_path, caplog):
    image = tmp_path / "x.png"
    code = cli(
        "predict", image, "--method", "musc", "--neighbours", "3", "--output", tmp_path / "o"
    )
    assert code == 2
    assert "--neighbours do not apply to --method musc" in caplog.text
