"""A user's first hour, end to end: one messy folder of real images through ``predict``,
``test`` and ``calibrate``, every output checked, every file readable by colleagues.

The folder has nested classes, an MVTec-style ``ground_truth/`` of real masks, a linked
folder, 12-bit data in a 16-bit PNG, a truncated JPEG and a wide image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import cli, write_tiny_model

TILE = Path("datasets") / "magnetic_tile"


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def build_messy_folder(shared_dir: Path, root: Path) -> dict[str, Path]:
    source = shared_dir / TILE
    good = sorted((source / "test" / "good").iterdir())
    cracks = sorted((source / "test" / "crack").iterdir())[:3]
    for folder in ("test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    for path in good[:4]:
        shutil.copy(path, root / "test" / "good" / path.name)
    for path in cracks:
        shutil.copy(path, root / "test" / "crack" / path.name)
        mask = source / "ground_truth" / "crack" / f"{path.stem}_mask.png"
        shutil.copy(mask, root / "ground_truth" / "crack" / mask.name)
    # the last crack truncated: its header (and size) still read, its pixels do not
    broken = root / "test" / "crack" / cracks[-1].name
    broken.write_bytes(broken.read_bytes()[:600])
    # 12-bit camera data in a 16-bit PNG
    grey = np.asarray(Image.open(good[4]).convert("L"), dtype=np.uint16) * 16
    twelve = root / "test" / "good" / "camera_12bit.png"
    Image.fromarray(grey.astype(np.uint16)).save(twelve)
    # a wide image: three tiles side by side
    parts = [Image.open(path).convert("RGB").resize((200, 200)) for path in good[5:8]]
    wide = Image.new("RGB", (600, 200))
    for index, part in enumerate(parts):
        wide.paste(part, (200 * index, 0))
    wide.save(root / "test" / "good" / "wide.png")
    # a linked folder of more images, kept elsewhere
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    for path in good[8:10]:
        shutil.copy(path, elsewhere / path.name)
    (root / "more").symlink_to(elsewhere, target_is_directory=True)
    return {"broken": broken, "twelve": twelve}


def assert_readable_by_others(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == 0o644, f"{path} has mode {oct(mode)}"


def test_predict_test_and_calibrate_on_a_messy_folder(
    tmp_path, shared_dir, tiny_model_files, caplog
):
    clip_path, checkpoint, _ = tiny_model_files
    root = tmp_path / "messy"
    special = build_messy_folder(shared_dir, root)
    caplog.set_level(logging.INFO)
    model = ["--clip-weights", clip_path, "--image-size", "64", "--no-progress"]
    previous = os.umask(0o022)
    try:
        # predict: annotations skipped, the link followed, the truncated file reported
        out = tmp_path / "predicted"
        code = cli("predict", root, *model, "--checkpoint", checkpoint, "--output-dir", out)
        assert code == 0
        summary = json.loads((out / "summary.json").read_text())
        scored = [json.loads(line)["image"] for line in (out / "predictions.jsonl").open()]
        assert (
            summary["scored"] == len(scored) == 4 + 2 + 2 + 2
        )  # good, cracks, 12-bit+wide, linked
        assert not any("ground_truth" in image for image in scored)
        assert sum("/more/" in image for image in scored) == 2
        assert [s["image"] for s in summary["skipped"]] == [str(special["broken"])]
        assert "not scoring annotation folders" in caplog.text
        assert "12-bit image data in a 16-bit file" in caplog.text
        for name in ("predictions.csv", "report.html", "summary.json"):
            assert (out / name).stat().st_size > 0
        assert len(list((out / "overlays").iterdir())) == len(scored)
        assert_readable_by_others(out)

        # test: the truncated image is skipped and counted, metrics on the rest
        results = tmp_path / "tested"
        code = cli("test", root, *model, "--checkpoint", checkpoint, "-o", results)
        assert code == 0
        (dataset_dir,) = [p for p in results.iterdir() if p.is_dir()]
        data = json.loads((dataset_dir / "results.json").read_text())
        assert data["skipped"][0]["image"].endswith(special["broken"].name)
        (row,) = data["classes"]
        assert (row["normal"], row["anomalous"]) == (6, 2)
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
        assert_readable_by_others(results)

        # calibrate with the real masks: thresholds in a checkpoint others can read
        calibrated = tmp_path / "calibrated" / "line.pt"
        calibrated.parent.mkdir()
        code = cli(
            "calibrate",
            root / "test" / "good",
            *model,
            "--checkpoint",
            checkpoint,
            "--anomalous",
            root / "test" / "crack",
            "--masks",
            root / "ground_truth" / "crack",
            "-o",
            calibrated,
            "--summary",
            calibrated.with_suffix(".json"),
        )
        assert code == 0
        details = json.loads(calibrated.with_suffix(".json").read_text())
        assert (details["n_good"], details["n_anomalous"], details["n_masks"]) == (6, 2, 2)
        assert [s["image"] for s in details["skipped"]] == [str(special["broken"])]
        stored = torch.load(calibrated, map_location="cpu", weights_only=True)
        assert stored["config"]["image_threshold"] == pytest.approx(details["image_threshold"])
        assert_readable_by_others(calibrated.parent)
    finally:
        os.umask(previous)
