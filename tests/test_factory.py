"""The one factory: identity by content, precedence of settings, moved weights, old files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from anomalyclip.cli import main as cli
from anomalyclip.methods.anomalyclip.checkpoint import read_checkpoint, save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import create_model
from anomalyclip.utils.atomic import atomic_torch_save
from tests.factories import tiny_clip

TINY = dict(
    image_size=32,
    features=(2, 4),
    dpam_layers=3,
    n_ctx=4,
    prompt_depth=2,
    deep_prompt_length=2,
    sigma=1.0,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "machine_a" / "tiny_clip.pt"
    path.parent.mkdir()
    torch.save(tiny_clip().state_dict(), path)
    return path


@pytest.fixture
def isolated_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")


def trained(weights: Path, tmp_path: Path) -> Path:
    model = create_model(None, weights, config=AnomalyCLIPConfig(**TINY), seed=3)
    with torch.no_grad():
        model.prompt_learner.ctx_pos.add_(0.25)
    return save_checkpoint(tmp_path / "prompts.pt", model)


def test_checkpoint_records_the_backbone_by_name_and_checksum_never_by_path(weights, tmp_path):
    checkpoint = read_checkpoint(trained(weights, tmp_path))
    assert checkpoint.config.backbone == "tiny_clip.pt"
    assert checkpoint.backbone["name"] == "tiny_clip.pt"
    assert checkpoint.backbone["sha256"] == sha256(weights)
    assert checkpoint.backbone["architecture"]["vision_layers"] == 4
    assert str(tmp_path) not in json.dumps(checkpoint.config.to_dict())


def test_checkpoint_loads_after_its_backbone_moved(weights, tmp_path, isolated_registry):
    """Bug: the path recorded in config.backbone broke loading once the weights moved."""
    path = trained(weights, tmp_path)
    original = create_model(path, weights)
    moved = tmp_path / "machine_b" / "elsewhere.pt"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    again = create_model(path, moved)
    for name, value in original.prompt_learner.state_dict().items():
        torch.testing.assert_close(again.prompt_learner.state_dict()[name], value, rtol=0, atol=0)
    assert again.backbone.sha256 == original.backbone.sha256
    # Without --clip-weights the name is not a registered one: the error says what to pass.
    with pytest.raises(FileNotFoundError, match="pass its weights file with --clip-weights"):
        create_model(path)


def test_checkpoint_resolves_its_backbone_through_the_registry(weights, tmp_path, monkeypatch):
    path = trained(weights, tmp_path)
    cache = tmp_path / "cache"
    digest = sha256(weights)
    (tmp_path / "registry.json").write_text(
        json.dumps(
            {
                "team-clip": {
                    "kind": "backbone",
                    "url": "http://127.0.0.1:9/x.pt",
                    "sha256": digest,
                    "filename": "x.pt",
                }
            }
        )
    )
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(cache))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    target = cache / digest[:16] / "x.pt"
    target.parent.mkdir(parents=True)
    shutil.copy(weights, target)
    weights.unlink()
    model = create_model(path)  # found by its checksum: the recorded name is not registered
    assert model.backbone.name == "team-clip" and model.backbone.sha256 == digest


def test_weights_with_another_checksum_are_refused_saying_what_differs(weights, tmp_path):
    path = trained(weights, tmp_path)
    other = tmp_path / "other.pt"
    torch.save(tiny_clip(seed=5).state_dict(), other)
    with pytest.raises(
        ValueError,
        match=r"trained on another backbone.*sha256 [0-9a-f]{16}\.\.\. "
        r"recorded, [0-9a-f]{16}\.\.\. given",
    ):
        create_model(path, other)
    deeper = tmp_path / "deeper.pt"
    torch.save(tiny_clip(vision_layers=5).state_dict(), deeper)
    with pytest.raises(ValueError, match="vision_layers 4 recorded, 5 given"):
        create_model(path, deeper)


def test_old_checkpoint_with_a_path_still_loads_with_a_warning(weights, tmp_path, caplog):
    path = trained(weights, tmp_path)
    data = torch.load(path, weights_only=True)
    data["config"]["backbone"] = str(weights.resolve())
    data["backbone"]["name"] = str(weights.resolve())
    old = tmp_path / "old.pt"
    atomic_torch_save(data, old)
    with caplog.at_level(logging.WARNING):
        model = create_model(old)
    assert "as a machine path" in caplog.text
    assert model.config.backbone == "tiny_clip.pt"


def test_precedence_checkpoint_then_preset_then_overrides(weights, tmp_path):
    path = trained(weights, tmp_path)
    model = create_model(
        path, weights, preset="no-dpam", overrides={"sigma": 2.0, "features": None}
    )
    assert model.config.dpam_layers == 0  # preset over the checkpoint's 3
    assert model.config.sigma == 2.0  # override over the checkpoint's 1.0
    assert model.config.features == (2, 4)  # None means "not given"
    last = create_model(path, weights, preset="single-layer")
    assert last.config.features == (4,)  # "last" is resolved on the backbone's depth


def test_fresh_prompts_are_seeded(weights):
    first = create_model(None, weights, config=AnomalyCLIPConfig(**TINY), seed=7)
    second = create_model(None, weights, config=AnomalyCLIPConfig(**TINY), seed=7)
    torch.testing.assert_close(first.prompt_learner.ctx_pos, second.prompt_learner.ctx_pos)


def test_replace_can_clear_a_calibrated_threshold():
    """Bug: replace() dropped None, so a calibrated threshold could not be cleared."""
    config = AnomalyCLIPConfig(image_threshold=0.7, pixel_threshold=1.5)
    cleared = config.replace(image_threshold=None)
    assert cleared.image_threshold is None and cleared.pixel_threshold == 1.5
    assert cleared.postprocessor().image_threshold_source is None


def test_trained_calibrated_and_saved_loads_elsewhere_through_the_cli(weights, tmp_path):
    """A model trained, calibrated and saved on one machine loads on another."""
    prompts = trained(weights, tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (40, 30), (index * 40, 90, 200)).save(good / f"{index}.png")
    calibrated = tmp_path / "calibrated.pt"
    flags = ["--checkpoint", str(prompts), "--clip-weights", str(weights)]
    assert cli(["calibrate", str(good), *flags, "-o", str(calibrated), "--no-progress"]) == 0
    moved = tmp_path / "machine_b" / "clip.pt"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    out = tmp_path / "out.jsonl"
    code = cli(
        [
            "predict",
            str(good),
            "--checkpoint",
            str(calibrated),
            "--clip-weights",
            str(moved),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["anomalous"] is not None for r in records)
