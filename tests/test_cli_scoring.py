"""``--reference`` and ``--tile-size`` through the commands: a reference bank calibrated,
saved beside the checkpoint and reused; tiles on big images; several methods served."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from anomalyclip.cli import build_parser
from anomalyclip.methods.anomalyclip.few_shot import FewShotAnomalyCLIP, ReferenceBank
from anomalyclip.methods.musc.few_shot import MuScWithReferences
from anomalyclip.methods.tiled import TiledPredictor, Tiling
from tests.helpers import cli, copy_tiles, model_arguments, write_tiny_model


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_calibrate_on_references_then_predict_reuses_their_bank(
    tmp_path, shared_dir, tiny_model_files, caplog
):
    good = copy_tiles(shared_dir, tmp_path / "refs", {"good": 4})
    new = copy_tiles(shared_dir, tmp_path / "new", {"good": 1, "crack": 1})
    calibrated = tmp_path / "line3.pt"
    model = model_arguments(tiny_model_files)
    arguments = ["--reference", tmp_path / "refs", "--bank-dtype", "float16", "--no-progress"]
    assert cli("calibrate", *model, *arguments, "-o", calibrated) == 0
    bank = ReferenceBank.load(tmp_path / "line3.bank.pt")
    # references alone: half are the bank, the other half scored against it as new
    # parts will be (issue 24 item 2)
    assert bank.count == 2 and bank.patches[1].dtype.itemsize == 2
    assert set(bank.sources) < {str(p) for p in good}

    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    clip_path = tiny_model_files[0]
    common = ["--clip-weights", clip_path, "--image-size", "64", "--no-progress"]
    assert (
        cli("predict", tmp_path / "new", "--checkpoint", calibrated, *common, "--output-dir", out)
        == 0
    )
    assert "reference bank: 2 images" in caplog.text
    results = records(out)
    assert len(results) == len(new)
    assert all(r["anomalous"] is not None and r["mask"] for r in results)  # thresholds apply
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_threshold_source"] == "calibrated"

    # the bank gone: said plainly, not a silent fallback to zero-shot thresholds
    (tmp_path / "line3.bank.pt").unlink()
    caplog.clear()
    code = cli(
        "predict", new[0], "--checkpoint", calibrated, *common, "--output", tmp_path / "p.jsonl"
    )
    assert code == 2
    assert "their bank" in caplog.text and "line3.bank.pt is missing" in caplog.text


def test_predict_with_reference_images_and_tiles(tmp_path, shared_dir, tiny_model_files):
    copy_tiles(shared_dir, tmp_path / "refs", {"good": 2})
    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)).save(wide)
    maps = tmp_path / "maps"
    arguments = [*model_arguments(tiny_model_files), "--no-progress", "--save-maps", maps]
    assert cli("predict", wide, *arguments, "--output", tmp_path / "plain.jsonl") == 0
    assert np.load(maps / "wide.npy").shape == (64, 64)
    tiled = [*arguments, "--tile-size", "50", "--reference", tmp_path / "refs"]
    assert cli("predict", wide, *tiled, "--output", tmp_path / "tiled.jsonl") == 0
    assert np.load(maps / "wide.npy").shape == (128, 384)  # the image at 64 / 50 scale
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x.png", "--tile-size", "many"])


def test_serve_offers_several_methods(monkeypatch, tiny_model_files):
    import uvicorn

    calls: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app))
    arguments = [*map(str, model_arguments(tiny_model_files)), "--features", "2", "4"]
    args = build_parser().parse_args(["serve", *arguments, "--offer", "musc"])
    assert args.func(args) == 0
    with TestClient(calls["app"]) as client:
        info = client.get("/v1/model").json()
        assert info["methods"] == ["anomalyclip", "musc"]
        musc = client.get("/v1/model", params={"method": "musc"}).json()
        assert musc["scores_sets"] is True and musc["image_size"] == 64


def test_few_shot_predictor_is_what_the_options_build(tmp_path, shared_dir, tiny_model_files):
    from anomalyclip.cli.options import build_predictor

    copy_tiles(shared_dir, tmp_path / "refs", {"good": 2})
    parser = build_parser()
    args = parser.parse_args(
        [
            "predict",
            "x.png",
            *map(str, model_arguments(tiny_model_files)),
            "--reference",
            str(tmp_path / "refs"),
        ]
    )
    predictor = build_predictor(args)
    assert isinstance(predictor, FewShotAnomalyCLIP) and predictor.bank.count == 2
    clip_path = str(tiny_model_files[0])
    musc = parser.parse_args(
        ["predict", "x.png", "--method", "musc", "--clip-weights", clip_path, "--image-size", "32"]
        + ["--features", "2", "4", "--reference", str(tmp_path / "refs"), "--tile-size", "100"]
    )
    tiled = build_predictor(musc)
    assert isinstance(tiled, TiledPredictor) and tiled.method == "musc"
    # the bank is the references' tiles, cut as the images scored are (issue 24)
    tiles = sum(
        len(Tiling(100).boxes(Image.open(path).size)) for path in (tmp_path / "refs").rglob("*.*")
    )
    assert isinstance(tiled.inner, MuScWithReferences) and tiled.inner.count == tiles > 2
